"""config.json in both spellings (the hub's transformers-4 files, transformers 5's) means the same model."""

from __future__ import annotations

import pytest

from gemma_export.config.model_config import GLOBAL, SLIDING, parse_config
from gemma_export.errors import BadInput

# As the hub's files are written (transformers 4): fields equal to the defaults are omitted.
HUB_CONFIGS = {
    "gemma-2b": {
        "architectures": ["GemmaForCausalLM"],
        "model_type": "gemma",
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "hidden_act": "gelu",
        "rope_theta": 10000.0,
        "vocab_size": 256000,
    },
    "gemma-2-9b": {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_attention_heads": 16,
        "num_hidden_layers": 42,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "rope_theta": 10000.0,
    },
    "gemma-3-1b": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "rope_theta": 1000000,
        "rope_local_base_freq": 10000,
        "rope_scaling": None,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
    },
    # The multimodal 4B: its text_config lists only what differs from Gemma3TextConfig's defaults.
    "gemma-3-4b": {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
        "vision_config": {"model_type": "siglip_vision_model"},
    },
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_spelling_reads_as_transformers_reads_it(name: str) -> None:
    """Parse the hub file ourselves, and parse what transformers 5 makes of it: the same model either way."""
    import transformers

    raw = HUB_CONFIGS[name]
    ours = parse_config(raw)
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})
    assert parse_config(hf.to_dict()) == ours
    text = hf.get_text_config()
    assert list(ours.layer_types) == list(getattr(text, "layer_types", None) or [GLOBAL] * ours.num_hidden_layers)
    assert ours.vocab_size == text.vocab_size and ours.head_dim == text.head_dim


def test_layer_assignment_per_generation() -> None:
    g2 = parse_config(HUB_CONFIGS["gemma-2-9b"])
    assert g2.layer_types[:4] == (SLIDING, GLOBAL, SLIDING, GLOBAL)  # even layers local
    assert g2.window_of(0) == 4096 and g2.window_of(1) == 0
    g3 = parse_config(HUB_CONFIGS["gemma-3-1b"])
    assert [i for i, t in enumerate(g3.layer_types) if t == GLOBAL] == [5, 11, 17, 23]
    g1 = parse_config(HUB_CONFIGS["gemma-2b"])
    assert set(g1.layer_types) == {GLOBAL} and g1.max_window == 0


def test_rope_per_layer_type() -> None:
    g3 = parse_config(HUB_CONFIGS["gemma-3-4b"])
    assert g3.rope[SLIDING].theta == 10_000 and g3.rope[SLIDING].factor == 1
    assert g3.rope[GLOBAL].theta == 1_000_000 and g3.rope[GLOBAL].factor == 8
    assert g3.source_model_type == "gemma3" and g3.sliding_window == 1024


def test_scaling_and_softcaps() -> None:
    g1 = parse_config(HUB_CONFIGS["gemma-2b"])
    assert g1.attention_scale == 256**-0.5 and g1.attn_logit_softcapping == 0
    g2 = parse_config({**HUB_CONFIGS["gemma-2-9b"], "query_pre_attn_scalar": 144})
    assert g2.attention_scale == 144**-0.5  # query_pre_attn_scalar, not head_dim
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    no_cap = parse_config({**HUB_CONFIGS["gemma-2-9b"], "final_logit_softcapping": None})
    assert no_cap.final_logit_softcapping == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "supported: gemma, gemma2, gemma3_text, gemma3"),
        ({"hidden_size": "3584"}, "'hidden_size' must be an integer"),
        ({"num_key_value_heads": 5}, "must be a multiple of num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope type 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"layer_types": ["sliding_attention"]}, "'layer_types' must list 42 entries"),
        ({"sliding_window": None, "layer_types": ["sliding_attention"] * 42}, "'sliding_window' must be a positive"),
    ],
)
def test_bad_config_is_one_line_error(change: dict, message: str) -> None:
    with pytest.raises(BadInput) as err:
        parse_config({**HUB_CONFIGS["gemma-2-9b"], **change}, source="x/config.json")
    assert message in str(err.value)
    assert str(err.value).startswith("x/config.json") and "\n" not in str(err.value)
