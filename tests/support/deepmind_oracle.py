"""google-deepmind/recurrentgemma's PyTorch Griffin as an independent oracle for our RecurrentGemma reference.

The PyPI package (`recurrentgemma==1.0.1`, installed with `--no-deps`: its metadata pins numpy<2.4) imports
JAX and flax from its top-level `__init__`; its PyTorch implementation needs neither, so the parent package is
stubbed and only `recurrentgemma.torch` is imported (it needs einops, jaxtyping and sentencepiece).

Weight mapping, ours (the HF checkpoint's names without `model.`) -> deepmind's:

    embed_tokens.weight                          embedder.input_embedding
    layers.i.{temporal,channel}_pre_norm.weight  blocks.i.{temporal,channel}_pre_norm.scale   both (1 + scale)
    final_norm.weight                            final_norm.scale
    temporal_block.linear_{x,y,out}              recurrent_block.linear_{x,y,out}
    temporal_block.conv_1d.weight [W, 1, K]      recurrent_block.conv_1d.w [K, W] = weight[:, 0, :].T
        (both put the newest input on the last tap: deepmind's w[K - 1 - s] and our weight[:, 0, K - 1 - s]
        multiply x[t - s])
    temporal_block.conv_1d.bias                  recurrent_block.conv_1d.b
    temporal_block.rg_lru.recurrent_param        recurrent_block.rg_lru.a_param
    temporal_block.rg_lru.input_gate_{weight,bias}      recurrent_block.rg_lru.input_gate.{w,b}
    temporal_block.rg_lru.recurrent_gate_{weight,bias}  recurrent_block.rg_lru.a_gate.{w,b}
    temporal_block.{q,k,v,o}_proj                attention_block.proj_{q,k,v,final}
    mlp_block.{gate,up}_proj.weight [E, D]       mlp_block.ffw_up.w [2, D, E]: [0] = gate.T (gelu'd), [1] = up.T
    mlp_block.{gate,up}_proj.bias [E]            mlp_block.ffw_up.b [2, 1, 1, E]
    mlp_block.down_proj                          mlp_block.ffw_down

Window convention: deepmind's `attention_window_size` counts the keys *before* the query (a query sees
window + 1 keys: `q_pos <= k_pos + window`, and its decode cache holds `window` keys besides the new one),
while ours and transformers' count the query's own key too (a query sees `window` keys). `to_deepmind`
therefore gives deepmind `attention_window_size - 1` unless told `literal_window=True`.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from gemma_export.models.griffin import GriffinModel


def import_deepmind():
    """`recurrentgemma.torch`, without the JAX half of the package; skips the test if it is not installed."""
    if "recurrentgemma.torch" in sys.modules:
        return sys.modules["recurrentgemma.torch"]
    spec = importlib.util.find_spec("recurrentgemma")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("google-deepmind's recurrentgemma is not installed (make install adds recurrentgemma==1.0.1)")
    if "recurrentgemma" not in sys.modules:
        pkg = types.ModuleType("recurrentgemma")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = pkg
    try:
        import recurrentgemma.torch as rg
    except ImportError as e:
        pytest.skip(f"recurrentgemma.torch does not import ({e}); it needs einops, jaxtyping and sentencepiece")
    return rg


def deepmind_config(model: GriffinModel, literal_window: bool = False):
    rg = import_deepmind()
    cfg = model.cfg
    kinds = {"recurrent": rg.TemporalBlockType.RECURRENT, "attention": rg.TemporalBlockType.ATTENTION}
    if cfg.num_key_value_heads != 1 or cfg.conv1d_width != 4 or cfg.partial_rotary_factor != 0.5:
        raise ValueError("deepmind's Griffin hard-codes one key/value head, a Conv1D of width 4 and RoPE on half")
    if cfg.rope_theta != 10_000.0 or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        raise ValueError("deepmind's Griffin hard-codes rope_theta 10000 and head_dim = width // heads")
    return rg.GriffinConfig(
        vocab_size=cfg.vocab_size,
        width=cfg.hidden_size,
        mlp_expanded_width=cfg.intermediate_size // 2,
        num_heads=cfg.num_attention_heads,
        block_types=tuple(kinds[k] for k in cfg.block_types),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=cfg.attention_window_size if literal_window else cfg.attention_window_size - 1,
        logits_soft_cap=cfg.logits_soft_cap,
        lru_width=cfg.lru_width,
    )


def to_deepmind(model: GriffinModel, literal_window: bool = False):
    """deepmind's `Griffin` (float32, eval) holding `model`'s weights; every one of its parameters is filled."""
    rg = import_deepmind()
    config = deepmind_config(model, literal_window)
    if model.cfg.rms_norm_eps != 1e-6:
        raise ValueError("deepmind's Griffin hard-codes rms_norm_eps 1e-6")
    ours = {k: v.detach().float() for k, v in model.state_dict().items()}
    theirs: dict[str, torch.Tensor] = {"embedder.input_embedding": ours["embed_tokens.weight"]}
    theirs["final_norm.scale"] = ours["final_norm.weight"]
    for i, kind in enumerate(model.cfg.block_types):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        theirs[dst + "temporal_pre_norm.scale"] = ours[src + "temporal_pre_norm.weight"]
        theirs[dst + "channel_pre_norm.scale"] = ours[src + "channel_pre_norm.weight"]
        t = src + "temporal_block."
        if kind == "recurrent":
            r = dst + "recurrent_block."
            for name in ("linear_x", "linear_y", "linear_out"):
                theirs[f"{r}{name}.weight"] = ours[f"{t}{name}.weight"]
                theirs[f"{r}{name}.bias"] = ours[f"{t}{name}.bias"]
            theirs[r + "conv_1d.w"] = ours[t + "conv_1d.weight"][:, 0, :].t()
            theirs[r + "conv_1d.b"] = ours[t + "conv_1d.bias"]
            theirs[r + "rg_lru.a_param"] = ours[t + "rg_lru.recurrent_param"]
            for gate, ours_gate in (("input_gate", "input_gate"), ("a_gate", "recurrent_gate")):
                theirs[f"{r}rg_lru.{gate}.w"] = ours[f"{t}rg_lru.{ours_gate}_weight"]
                theirs[f"{r}rg_lru.{gate}.b"] = ours[f"{t}rg_lru.{ours_gate}_bias"]
        else:
            a = dst + "attention_block."
            for name, ours_name in (("proj_q", "q_proj"), ("proj_k", "k_proj"), ("proj_v", "v_proj")):
                theirs[f"{a}{name}.weight"] = ours[f"{t}{ours_name}.weight"]
            theirs[a + "proj_final.weight"] = ours[t + "o_proj.weight"]
            theirs[a + "proj_final.bias"] = ours[t + "o_proj.bias"]
        m, mm = src + "mlp_block.", dst + "mlp_block."
        theirs[mm + "ffw_up.w"] = torch.stack((ours[m + "gate_proj.weight"].t(), ours[m + "up_proj.weight"].t()))
        theirs[mm + "ffw_up.b"] = torch.stack((ours[m + "gate_proj.bias"], ours[m + "up_proj.bias"]))[:, None, None]
        theirs[mm + "ffw_down.weight"] = ours[m + "down_proj.weight"]
        theirs[mm + "ffw_down.bias"] = ours[m + "down_proj.bias"]

    with torch.device("meta"):
        griffin = rg.Griffin(config, gradient_checkpointing=False, dtype=torch.float32)
    expected = griffin.state_dict()
    missing, extra = sorted(set(expected) - set(theirs)), sorted(set(theirs) - set(expected))
    if missing or extra:
        raise AssertionError(f"deepmind mapping incomplete: missing {missing}, unexpected {extra}")
    for name, value in theirs.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise AssertionError(f"{name}: ours {tuple(value.shape)} vs deepmind {tuple(expected[name].shape)}")
    griffin.load_state_dict({k: v.contiguous().clone() for k, v in theirs.items()}, strict=True, assign=True)
    return griffin.eval()
