"""GGUF input (gemma_export/checkpoint/gguf.py): llama.cpp's files build like Hugging Face folders.

Tiny GGUFs are written here the way llama.cpp's converter writes Gemma (`convert_hf_to_gguf.py`: its metadata
keys, its tensor names from gguf's own name map, every `*norm.weight` stored as 1 + w, a SentencePiece
vocabulary) from the suite's tiny random checkpoints, with a mix of quantized types (gguf.quants.quantize).
The oracle is transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which reads Gemma 2 and 3
files (not Gemma 1: for it, the source checkpoint with the round-tripped weights). The real Gemma-3-270M GGUF,
when present, is compared with transformers' reading of it: config, every dequantized tensor, the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from gemma_export.checkpoint import gguf as gguf_checkpoint
from gemma_export.checkpoint.files import read_tensors
from gemma_export.cli.main import main
from gemma_export.config.model_config import load_config, parse_config
from gemma_export.dev.random_checkpoint import BYTE_TOKENS, SPECIAL_TOKENS, TINY_CONFIGS, write_random_checkpoint
from gemma_export.errors import BadInput
from gemma_export.manifest import Manifest
from gemma_export.pipeline import memory
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder
from tests.support.checkpoints import FIXTURE_OVERRIDES, save_hf_checkpoint

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
ARCH = {"gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
# A mix of ggml types, as llama.cpp's quantizer mixes them (K-quants need rows of 256: wider than these models,
# and the real file below has them). Norms stay F32, as llama.cpp keeps every 1-D tensor.
TYPES = {"embed_tokens": Q.Q8_0, "q_proj": Q.Q4_0, "k_proj": Q.Q5_0, "v_proj": Q.F32, "o_proj": Q.Q5_1,
         "gate_proj": Q.Q4_1, "up_proj": Q.F16, "down_proj": Q.BF16}  # fmt: skip
# A GGUF has no query_pre_attn_scalar: llama.cpp scales by head_dim ** -0.5 (except at the 27B depths), so the
# source checkpoints use head_dim (tiny gemma2's own 24 has no GGUF spelling). Gemma 2's small caps bind.
SOURCE_OVERRIDES = {"gemma2": {**FIXTURE_OVERRIDES["gemma2"], "query_pre_attn_scalar": 16}}
# Pieces llama.cpp's Gemma vocabularies have that the tiny tokenizer lacks: runs of spaces spelled with real
# spaces, newlines and tabs (user-defined: matched whole), image markers, an unused control token.
EXTRA_PIECES = [("  ", 4), ("   ", 4), ("\n", 4), ("\n\n", 4), ("\t", 4), ("<start_of_image>", 4),
                ("[multimodal]", 4), ("<unused0>", 3)]  # fmt: skip
PROMPT_LENGTH = 40  # past twice the tiny window (16)
SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "a  b   c    d\t\te\n\n\nf \n \t end  ",
    " leading space and trailing ",
    "naïve café: 😀🚀 日本語のテキスト, 한국어, Ελληνικά",
    "control \x00\x01\x7f bytes \u200b zero-width © ™",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask> [multimodal]<start_of_image> <unused0>",
    "",
]
REAL_GGUF = Path("/root/.cache/gemma-export/real/gemma-3-270m-q4_k_m.gguf")
LICENSE_TEXT = Path("/usr/share/common-licenses/GPL-3")


# ---- writing GGUFs as llama.cpp does -----------------------------------------------------------------------


def vocabulary(source: Path, size: int) -> tuple[list[str], list[int], list[float]]:
    """The source tokenizer's pieces as a SentencePiece vocabulary (pieces, llama.cpp token types, scores),
    padded to the embedding's rows with unused `[PADn]` pieces as llama.cpp's converter pads it."""
    ids = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab()
    pieces = [*sorted(ids, key=ids.__getitem__), *(p for p, _ in EXTRA_PIECES)]
    pieces += [f"[PAD{i}]" for i in range(len(pieces), size)]
    extra = {**dict(EXTRA_PIECES), **{p: 5 for p in pieces if p.startswith("[PAD")}}
    types = [3 if p in SPECIAL_TOKENS else 6 if p in BYTE_TOKENS else extra.get(p, 1) for p in pieces]
    scores = [-1000.0 if t == 3 else 0.0 if t == 6 else -float(i) for i, t in enumerate(types)]
    return pieces, types, scores


def stored(name: str, value: np.ndarray, types: dict[str, Q]) -> tuple[np.ndarray, Q]:
    """What llama.cpp's converter stores for a Hugging Face tensor: norms as F32 1 + w, the rest quantized."""
    if name.endswith("norm.weight"):
        return value + np.float32(1), Q.F32
    qtype = next((t for key, t in types.items() if f".{key}." in name), Q.F32)
    return gguf.quants.quantize(value, qtype), qtype


def write_gguf(source: Path, path: Path, *, types: dict[str, Q] = TYPES, arch: str | None = None,
               drop: tuple[str, ...] = (), skip_keys: tuple[str, ...] = (), keys: dict[str, object] | None = None,
               extra_keys: dict[str, tuple[str, object]] | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:  # fmt: skip
    """`source` (a Hugging Face folder) as llama.cpp's convert_hf_to_gguf.py writes it; `keys` replaces the
    values of some `{arch}.*` keys, `skip_keys` leaves some out, `extra_keys` adds (kind, value) ones, `drop`
    leaves tensors out."""
    cfg = load_config(source)
    model_arch = ARCH[cfg.model_type]
    arch = arch or gguf.MODEL_ARCH_NAMES[model_arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    written: dict[str, tuple[str, object]] = {
        "context_length": ("uint32", cfg.max_position_embeddings),
        "embedding_length": ("uint32", cfg.hidden_size),
        "block_count": ("uint32", cfg.num_hidden_layers),
        "feed_forward_length": ("uint32", cfg.intermediate_size),
        "attention.head_count": ("uint32", cfg.num_attention_heads),
        "attention.head_count_kv": ("uint32", cfg.num_key_value_heads),
        "attention.layer_norm_rms_epsilon": ("float32", cfg.rms_norm_eps),
        "attention.key_length": ("uint32", cfg.head_dim),
        "attention.value_length": ("uint32", cfg.head_dim),
    }
    if cfg.model_type == "gemma2":
        written["attn_logit_softcapping"] = ("float32", cfg.attn_logit_softcapping)
        written["final_logit_softcapping"] = ("float32", cfg.final_logit_softcapping)
    if cfg.model_type != "gemma":
        written["attention.sliding_window"] = ("uint32", cfg.sliding_window)
    if cfg.model_type == "gemma3_text":  # the global layers' rope; llama.cpp assumes 10,000 for the local ones
        rope = cfg.rope["full_attention"]
        written["rope.freq_base"] = ("float32", rope.theta)
        if rope.factor != 1.0:
            written["rope.scaling.type"] = ("string", "linear")
            written["rope.scaling.factor"] = ("float32", rope.factor)
    for key, (kind, value) in written.items():
        if key not in skip_keys:
            getattr(writer, f"add_{kind}")(f"{arch}.{key}", (keys or {}).get(key, value))
    for key, (kind, value) in (extra_keys or {}).items():
        getattr(writer, f"add_{kind}")(key, value)
    pieces, token_types, scores = vocabulary(source, cfg.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    for kind, i in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_ids[0]), ("unk", 3), ("pad", cfg.pad_token_id)):
        getattr(writer, f"add_{kind}_token_id")(i)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)

    for name, value in load_file(str(source / "model.safetensors")).items():
        gguf_name = names.get_name(name.removesuffix(".weight")) + ".weight"
        if gguf_name in drop:
            continue
        data, qtype = stored(name, value.astype(np.float32), types)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def expected_tensors(source: Path, types: dict[str, Q] = TYPES) -> dict[str, torch.Tensor]:
    """What reading the GGUF must give: each source tensor through its type and back; norms (1 + w) - 1."""
    out = {}
    for name, value in load_file(str(source / "model.safetensors")).items():
        data, qtype = stored(name, value.astype(np.float32), types)
        array = gguf.quants.dequantize(data, qtype)
        out[name] = torch.from_numpy(array - np.float32(1) if name.endswith("norm.weight") else array.copy())
    return out


# ---- fixtures -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-sources")
    return {t: save_hf_checkpoint(root / t, t, **SOURCE_OVERRIDES.get(t, {})) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def ggufs(sources, tmp_path_factory) -> dict[str, Path]:
    """Each in a folder of its own (the folder form of the CLI, and transformers' `gguf_file=` take one)."""
    root = tmp_path_factory.mktemp("ggufs")
    out = {}
    for t, source in sources.items():
        (root / t).mkdir()
        out[t] = write_gguf(source, root / t / f"tiny-{t}-mixed.gguf")
    return out


@pytest.fixture(scope="module")
def gguf_artifacts(ggufs, tmp_path_factory) -> dict[str, Path]:
    return {}


def artifact_of(model_type: str, ggufs: dict[str, Path], artifacts: dict[str, Path], tmp: Path) -> Path:
    """Built once per model type: gemma3_text through the CLI from its folder, the others from the file."""
    if model_type not in artifacts:
        out = tmp / f"art-{model_type}"
        if model_type == "gemma3_text":
            assert main(["build", str(ggufs[model_type].parent), "-o", str(out), "--json"]) == 0
        else:
            build(ggufs[model_type], out, BuildOptions(), Stages(quiet=True))
        artifacts[model_type] = out
    return artifacts[model_type]


def transformers_oracle(model_type: str, path: Path, source: Path) -> torch.nn.Module:
    """transformers' load of the GGUF. It does not read the softcaps nor RoPE scaling from a GGUF, and takes
    query_pre_attn_scalar from its config class's defaults (256): those are passed as they are in the file (the
    config test below checks that ours come from the file); all else, and every weight, is transformers' own."""
    import transformers

    cfg = load_config(source)
    given: dict[str, object] = {"query_pre_attn_scalar": int(cfg.query_pre_attn_scalar)}
    if model_type == "gemma2":
        given.update(attn_logit_softcapping=cfg.attn_logit_softcapping,
                     final_logit_softcapping=cfg.final_logit_softcapping)  # fmt: skip
    if model_type == "gemma3_text":
        source_config = json.loads((source / "config.json").read_text())
        given["rope_parameters"] = source_config["rope_parameters"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **given
    )
    return model.eval()


def source_oracle(source: Path) -> torch.nn.Module:
    """Gemma 1 (transformers reads no `gemma` GGUF): the source checkpoint with the GGUF's weights."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(expected_tensors(source), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied
    return model


# ---- the tiny GGUFs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_config_is_the_source_checkpoints(model_type, sources, ggufs) -> None:
    """Everything llama.cpp's converter keeps, and what llama.cpp assumes (layer pattern, local RoPE base,
    query scaling, softcaps), gives back the config the checkpoint had."""
    ours = load_config(ggufs[model_type])
    assert ours == load_config(sources[model_type])
    assert load_config(ggufs[model_type].parent) == ours  # the folder holding it


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_tensors_are_the_dequantized_file_under_hf_names(model_type, sources, ggufs) -> None:
    tensors = read_tensors(ggufs[model_type])
    expected = expected_tensors(sources[model_type])
    assert sorted(tensors) == sorted(expected)
    kept = {}
    for name, want in expected.items():
        got = kept[name] = tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), name
    # A float32 tensor is the file's bytes, mapped (not a copy): the package stage copies it file to file.
    info = gguf_checkpoint.read_header(ggufs[model_type]).tensors["blk.1.attn_v.weight"]
    span = memory.FileMappings().file_span(kept["model.layers.1.self_attn.v_proj.weight"])
    assert span == (str(ggufs[model_type].resolve()), info.start, info.nbytes)


@pytest.mark.parametrize(("model_type", "depth"), [("gemma2", 46), ("gemma3_text", 62)])
def test_27b_depth_scales_queries_by_hidden_over_heads(model_type, depth, sources, tmp_path) -> None:
    """llama.cpp's rule: queries scale by (hidden / heads) ** -0.5 at Gemma 2 27B's and Gemma 3 27B's depth (HF's
    query_pre_attn_scalar 144 and 168), by head_dim ** -0.5 at every other depth."""
    wide = {"embedding_length": 96}  # hidden / heads = 24, head_dim 16
    shallow = write_gguf(sources[model_type], tmp_path / "shallow.gguf", keys=wide)
    deep = write_gguf(sources[model_type], tmp_path / "deep.gguf", keys={**wide, "block_count": depth})
    assert gguf_checkpoint.read_config(shallow)["query_pre_attn_scalar"] == 16
    assert gguf_checkpoint.read_config(deep)["query_pre_attn_scalar"] == 24


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_build_passes_its_gate_and_matches_transformers_on_a_long_prompt(
    model_type, sources, ggufs, gguf_artifacts, tmp_path_factory
) -> None:
    art = artifact_of(model_type, ggufs, gguf_artifacts, tmp_path_factory.mktemp("built"))
    manifest = Manifest.read(art)
    assert manifest.parity.passed
    oracle = (source_oracle(sources[model_type]) if model_type == "gemma"
              else transformers_oracle(model_type, ggufs[model_type], sources[model_type]))  # fmt: skip
    ids = np.random.default_rng(0).integers(5, TINY_CONFIGS[model_type]["vocab_size"], (1, PROMPT_LENGTH))
    with torch.no_grad():
        expected = oracle(input_ids=torch.from_numpy(ids)).logits.numpy()
    decoder = OrtDecoder(art, manifest)
    ones = np.ones_like(ids)
    got, _ = decoder.step(ids, ones, np.arange(PROMPT_LENGTH)[None], decoder.empty_cache(1))
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale, np.abs(got - expected).max() / scale


def test_manifest_records_the_gguf_source(ggufs, gguf_artifacts, tmp_path_factory) -> None:
    art = artifact_of("gemma3_text", ggufs, gguf_artifacts, tmp_path_factory.mktemp("built"))
    path = ggufs["gemma3_text"]
    source = Manifest.read(art).to_json()["model"]["source"]
    layers = TINY_CONFIGS["gemma3_text"]["num_hidden_layers"]
    types = {"F32": 7 * layers + 1, "Q8_0": 1, "Q4_0": layers, "Q5_0": layers, "Q5_1": layers,
             "Q4_1": layers, "F16": layers, "BF16": layers}  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert source == {"format": "gguf", "file": path.name, "sha256": digest, "bytes": path.stat().st_size,
                      "architecture": "gemma3", "tensor_types": dict(sorted(types.items()))}  # fmt: skip
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(Manifest.read(art).files)


def test_tokenizer_matches_transformers_gguf_tokenizer(ggufs, gguf_artifacts, tmp_path_factory) -> None:
    import transformers

    path = ggufs["gemma3_text"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(theirs) is transformers.GemmaTokenizer
    built = gguf_checkpoint.build_tokenizer(gguf_checkpoint.read_vocabulary(gguf_checkpoint.read_header(path)))
    assert json.loads(built.to_str()) == json.loads(theirs.backend_tokenizer.to_str())  # the same pipeline
    art = artifact_of("gemma3_text", ggufs, gguf_artifacts, tmp_path_factory.mktemp("built"))
    ours = Tokenizer.from_file(str(art / "tokenizer.json"))
    for text in SAMPLES:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
    assert ours.encode("  ").ids == [2, ours.token_to_id("▁▁")]  # a run of spaces, as normalized
    config = json.loads((art / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GemmaTokenizer" and config["add_bos_token"] is True
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")


# ---- bad input: one line, exit 2, no OUT ---------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith("[gemma-export] ")]  # progress lines
    assert len(lines) == 1 and lines[0].startswith("gemma-export: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def random_source(tmp_path_factory) -> Path:
    """A random-weight checkpoint (no transformers: milliseconds) to break GGUFs from."""
    return write_random_checkpoint(tmp_path_factory.mktemp("random") / "ckpt", TINY_CONFIGS["gemma3_text"])


def _truncated_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _truncated_data(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _bad_magic(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"GGML" + data[4:])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _nan_block_scale(path: Path) -> None:
    """The first Q4_0 block of a tensor gets the float16 scale NaN."""
    start = gguf_checkpoint.read_header(path).tensors["blk.0.attn_q.weight"].start
    data = bytearray(path.read_bytes())
    data[start : start + 2] = b"\xff\xff"
    path.write_bytes(bytes(data))


BROKEN_FILES = {
    "truncated header": (_truncated_header, {}, "truncated or corrupt GGUF file (tensor count 80 cannot fit"),
    "truncated data": (_truncated_data, {}, "truncated or corrupt GGUF file (tensor 'blk."),
    "bad magic": (_bad_magic, {}, "not a GGUF file (starts with b'GGML'"),
    "empty": (_empty, {}, "0 bytes, shorter than a GGUF header"),
    "llama": (None, {"arch": "llama"}, "unsupported GGUF architecture 'llama' (not a Gemma)"),
    "gemma3n": (None, {"arch": "gemma3n"}, "unsupported GGUF architecture 'gemma3n' (Gemma 3n"),
    "gemma4": (None, {"arch": "gemma4"}, "unsupported GGUF architecture 'gemma4'"),
    "missing tensor": (None, {"drop": ("blk.2.attn_k.weight",)}, "missing tensor 'blk.2.attn_k.weight'"),
    "missing key": (None, {"skip_keys": ("block_count",)}, "GGUF metadata key 'gemma3.block_count' is missing"),
    "integer tensor": (
        None,
        {"drop": ("blk.0.attn_q.weight",), "extra_tensors": {"blk.0.attn_q.weight": np.zeros((64, 64), np.int32)}},
        "tensor 'blk.0.attn_q.weight' has ggml type I32, which has no float dequantization",
    ),
    "split shard": (None, {"extra_keys": {"split.count": ("uint16", 3)}}, "one shard of a split GGUF (3 files)"),
    "NaN block scale": (_nan_block_scale, {}, "tensor 'blk.0.attn_q.weight' (Q4_0) dequantizes to inf or NaN"),
    "untied head": (None, {"extra_tensors": {"output.weight": np.zeros((512, 64), np.float32)}}, "an 'output.weight'"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_gguf_is_one_line_exit_2_and_no_output(case, random_source, tmp_path, capsys) -> None:
    corrupt, options, fact = BROKEN_FILES[case]
    path = write_gguf(random_source, tmp_path / "model.gguf", **options)
    if corrupt is not None:
        corrupt(path)
    gguf_checkpoint._read_header.cache_clear()
    out = tmp_path / "out"
    code, err = run_cli(capsys, "build", path, "-o", out)
    line = one_error_line(err)
    assert code == 2, err
    assert str(path) in line and fact in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_folder_with_two_ggufs_asks_for_the_file(random_source, tmp_path, capsys) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    write_gguf(random_source, folder / "a-Q8_0.gguf")
    shutil.copyfile(folder / "a-Q8_0.gguf", folder / "b-F16.gguf")
    out = tmp_path / "out"
    code, err = run_cli(capsys, "build", folder, "-o", out)
    line = one_error_line(err)
    assert code == 2 and "holds 2 .gguf files (a-Q8_0.gguf, b-F16.gguf); pass the one to build" in line, line
    assert not out.exists()


def test_corrupt_headers_are_bad_input_and_nothing_else(random_source, tmp_path) -> None:
    """Every cut of the header, and random byte flips in it, end in BadInput or in a file that reads (never in
    another exception, a hang, or a huge allocation: every count is checked against the bytes left)."""
    good = write_gguf(random_source, tmp_path / "good.gguf").read_bytes()
    header_end = min(t.start for t in gguf_checkpoint.read_header(tmp_path / "good.gguf").tensors.values())
    rng = np.random.default_rng(0)
    path = tmp_path / "bad.gguf"
    cases = [good[:cut] for cut in range(0, header_end, max(1, header_end // 60))]
    for _ in range(150):
        data = bytearray(good)
        for i in rng.integers(0, header_end, 3):
            data[i] = int(rng.integers(0, 256))
        cases.append(bytes(data))
    for data in cases:
        path.write_bytes(data)
        gguf_checkpoint._read_header.cache_clear()
        try:
            parse_config(gguf_checkpoint.read_config(path), str(path))
            tensors = gguf_checkpoint.read_tensors(path)
            for name in tensors:
                assert tensors[name].dtype == torch.float32
            gguf_checkpoint.write_tokenizer(path, tmp_path)
        except BadInput as e:
            assert "\n" not in str(e)


# ---- the real Gemma-3-270M GGUF -----------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not REAL_GGUF.is_file(), reason=f"{REAL_GGUF} is not on this machine")


@pytest.fixture(scope="module")
def transformers_reading():
    """transformers' config and dequantized tensors of the real file, read once (its GGUF reader is slow)."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # The model it maps tensor names with is made from our config (a meta model: names only); the config read
    # back is transformers' own, and a wrong name map would show as different tensor names.
    with torch.device("meta"):
        names_only = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**gguf_checkpoint.read_config(REAL_GGUF))
        )
    read = load_gguf_checkpoint(str(REAL_GGUF), return_tensors=True, model_to_load=names_only)
    return transformers.AutoConfig.for_model(**read["config"]), read["tensors"]


@pytest.mark.slow
@needs_real
def test_real_gguf_config_is_transformers(transformers_reading) -> None:
    theirs, _ = transformers_reading
    ours = load_config(REAL_GGUF)
    assert ours.model_type == theirs.model_type == "gemma3_text"
    assert list(ours.layer_types) == theirs.layer_types
    assert ours.layer_types.count("full_attention") == 3 and ours.sliding_window == theirs.sliding_window == 512
    rope = theirs.rope_parameters
    assert ours.rope["sliding_attention"].theta == rope["sliding_attention"]["rope_theta"] == 10_000
    assert ours.rope["full_attention"].theta == rope["full_attention"]["rope_theta"] == 1_000_000
    assert {r.factor for r in ours.rope.values()} == {1.0}
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "max_position_embeddings",
                  "bos_token_id", "pad_token_id"):  # fmt: skip
        assert getattr(ours, field) == getattr(theirs, field), field
    assert (ours.vocab_size, ours.head_dim, ours.num_hidden_layers) == (262144, 256, 18)
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-7)  # theirs: the float32 1e-6
    assert ours.eos_token_ids == (theirs.eos_token_id,)
    assert not ours.attn_logit_softcapping and not ours.final_logit_softcapping


@pytest.mark.slow
@needs_real
def test_real_gguf_tensors_are_transformers_dequantized_state_dict(transformers_reading) -> None:
    _, theirs = transformers_reading
    ours = read_tensors(REAL_GGUF)
    assert sorted(ours) == sorted(theirs)
    norms = 0
    for name in ours:
        got = ours[name]
        assert got.dtype == torch.float32 and torch.equal(got, theirs[name].float()), name
        norms += name.endswith("norm.weight")
    assert norms == 18 * 6 + 1  # every norm, the offset removed the same way
    assert gguf_checkpoint.tensor_types(gguf_checkpoint.read_header(REAL_GGUF)) == {
        "F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}  # fmt: skip


@pytest.mark.slow
@needs_real
def test_real_gguf_tokenizer_is_transformers(tmp_path) -> None:
    import transformers

    # The class AutoTokenizer picks for a Gemma GGUF (the tiny test above goes through AutoTokenizer), called
    # directly: AutoTokenizer would first read the whole file with transformers' slow GGUF reader for a config.
    theirs = transformers.GemmaTokenizer.from_pretrained(str(REAL_GGUF.parent), gguf_file=REAL_GGUF.name)
    assert gguf_checkpoint.write_tokenizer(REAL_GGUF, tmp_path) == ["tokenizer.json", "tokenizer_config.json"]
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [*SAMPLES, LICENSE_TEXT.read_text() if LICENSE_TEXT.is_file() else "", "<start_of_image><end_of_image>",
             "<table><tr><td>cell</td></tr></table>", "\t\tindented\n    code   ", "x" * 300]  # fmt: skip
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text[:80]
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text[:80]
    assert len(ours.encode(texts[len(SAMPLES)]).ids) > 5000  # the license: a long real text
