"""Write the conformance vectors of `ai.gemma::Attention` (graphs/attention.md) to graphs/attention/vectors/.

    .venv/bin/python graphs/attention/make_vectors.py [--out DIR]

Each case is one JSON file: attributes, inputs, the expected output and the query rows excluded from
comparison (rows with no visible key, whose output the spec leaves unspecified; stored as zeros). The script
is deterministic and independent of library versions:

- inputs come from a self-contained generator (splitmix64), rounded to 3 decimals; a reader takes each
  number as written and rounds it to the input dtype (float32, int64);
- the expected output is the spec's equations evaluated in float64 (numpy), rounded to float32 and written
  with the shortest repr that round-trips float32; which keys a query sees is gemma_export/ops/visibility.py's
  rule, the one the reference applies too. `attention_reference` (the PyTorch face of the op) must
  agree with it to 1e-6 on every compared row, or nothing is written.

tests/ops/test_attention.py regenerates the vectors into a temporary folder and requires the files on disk
to be byte-identical, so the spec, the vectors and the reference cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma_export.ops import visibility  # which keys a query sees: the rule, stated once (numpy, no torch)

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
OP = "ai.gemma::Attention"
OP_VERSION = 1
MASKED = float(np.finfo(np.float32).min)  # the value the spec gives to scores of invisible keys
REFERENCE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    dims: tuple[
        int, int, int, int, int, int
    ]  # batch, heads, kv_heads, seq (S, queries), total (T = past + S), head_dim
    scale: float  # exact binary fractions, so that the float32 attribute is the value written here
    softcap: float
    window: int
    causal: int
    left_pad: tuple[int, ...] = ()  # padding keys at the start of each batch row (default: none)
    # image blocks: (row, start, stop) key slots taking mask value 2, 3, ... in order; `blocks` the attribute
    # (1: bounded by the window, 2: not; 0: no blocks, the attribute left out of the file)
    runs: tuple[tuple[int, int, int], ...] = ()
    blocks: int = 0

    batch = property(lambda self: self.dims[0])
    heads = property(lambda self: self.dims[1])
    kv_heads = property(lambda self: self.dims[2])
    seq = property(lambda self: self.dims[3])
    total = property(lambda self: self.dims[4])
    head_dim = property(lambda self: self.dims[5])


# fmt: off
CASES = (
    Case("mha_causal", "multi-head (4 q / 4 kv heads), causal, global, no soft-cap",
         (1, 4, 4, 5, 5, 4), scale=0.5, softcap=0.0, window=0, causal=1),
    Case("gqa_causal_softcap", "grouped-query (4 q / 2 kv heads), causal, soft-cap 0.75 binds",
         (2, 4, 2, 6, 6, 8), scale=0.5, softcap=0.75, window=0, causal=1),
    Case("mqa_causal", "multi-query (4 q heads / 1 kv head), causal, global",
         (1, 4, 1, 4, 4, 8), scale=0.375, softcap=0.0, window=0, causal=1),
    Case("causal_window", "causal, window 3 < sequence 8 (3 keys, the current one included)",
         (1, 4, 2, 8, 8, 8), scale=0.375, softcap=0.0, window=3, causal=1),
    Case("causal_window_1", "causal, window 1: each query sees only itself",
         (1, 2, 1, 4, 4, 8), scale=0.5, softcap=0.0, window=1, causal=1),
    Case("causal_window_over_total", "causal, window 16 > total 5: the same as global",
         (1, 2, 2, 5, 5, 8), scale=0.5, softcap=0.0, window=16, causal=1),
    Case("causal_past_window_softcap", "causal with past (S=3 < T=9), window 4, soft-cap 2",
         (2, 4, 2, 3, 9, 8), scale=0.5, softcap=2.0, window=4, causal=1),
    Case("bidirectional_window", "bidirectional, window 2: |p - j| < 2 (3 keys)",
         (1, 2, 1, 7, 7, 8), scale=0.5, softcap=0.0, window=2, causal=0),
    Case("bidirectional_global_softcap", "bidirectional, global, soft-cap 0.75, left padding 2 (padding queries see "
         "the real keys: compared)",
         (2, 2, 2, 5, 5, 8), scale=0.5, softcap=0.75, window=0, causal=0, left_pad=(2, 0)),
    Case("bidirectional_window_padding", "bidirectional, window 2, left padding 3: padding queries 0 and 1 see no "
         "real key (excluded), padding query 2 sees key 3",
         (2, 4, 2, 6, 6, 8), scale=0.5, softcap=0.0, window=2, causal=0, left_pad=(3, 0)),
    Case("left_padding_causal_softcap", "causal, left padding 2 (queries 0 and 1 fully masked: excluded), "
         "soft-cap 0.75",
         (2, 4, 2, 6, 6, 8), scale=0.5, softcap=0.75, window=0, causal=1, left_pad=(2, 0)),
    Case("left_padding_causal_past_window", "causal with past (S=4 < T=8), window 3, left padding 5: query 0 "
         "(position 4) is padding (excluded)",
         (2, 2, 1, 4, 8, 8), scale=0.375, softcap=0.0, window=3, causal=1, left_pad=(5, 0)),
    Case("decode", "decode step S=1 with past 6, grouped-query, window 4, soft-cap 2, left padding 3",
         (2, 4, 2, 1, 7, 8), scale=0.5, softcap=2.0, window=4, causal=1, left_pad=(3, 0)),
    Case("decode_global_mqa", "decode step S=1 with past 8, multi-query, global",
         (1, 2, 1, 1, 9, 8), scale=0.25, softcap=0.0, window=0, causal=1),
    # image blocks (mask values >= 2): the same inputs in both modes, blocks longer than the window, left padding
    Case("blocks_in_window", "image blocks, blocks 1: a block's keys are visible past causality but not past the "
         "window 3 (AND(window, OR(causal, block))); row 0 left padding 2 then a block of 5, row 1 two blocks",
         (2, 4, 2, 10, 10, 8), scale=0.5, softcap=0.75, window=3, causal=1, left_pad=(2, 0),
         runs=((0, 3, 8), (1, 1, 3), (1, 4, 9)), blocks=1),
    Case("blocks_past_window", "image blocks, blocks 2: a block sees all of itself past the window 3 "
         "(OR(AND(window, causal), block)); the mask of blocks_in_window",
         (2, 4, 2, 10, 10, 8), scale=0.5, softcap=0.75, window=3, causal=1, left_pad=(2, 0),
         runs=((0, 3, 8), (1, 1, 3), (1, 4, 9)), blocks=2),
    Case("blocks_past_window_with_past", "blocks 2 with past (S=4 < T=11), window 2: a block of 7 across the past "
         "and the new keys; row 1 left padding 3",
         (2, 2, 1, 4, 11, 8), scale=0.375, softcap=0.0, window=2, causal=1, left_pad=(0, 3),
         runs=((0, 2, 9), (1, 4, 10)), blocks=2),
    Case("blocks_global", "blocks 1, global causal layer: a block's later keys visible, text causal",
         (1, 2, 2, 6, 6, 4), scale=0.5, softcap=0.0, window=0, causal=1, runs=((0, 1, 4),), blocks=1),
)
# fmt: on


# --- inputs ------------------------------------------------------------------------------------------------


def _splitmix64(seed: int):
    state = seed & 0xFFFFFFFFFFFFFFFF
    while True:
        state = (state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        yield z ^ (z >> 31)


def _uniform(shape: tuple[int, ...], seed: int, bound: int) -> np.ndarray:
    """Multiples of 0.001 in [-bound, bound], as float64 (exactly what the JSON file will say)."""
    gen = _splitmix64(seed)
    steps = 2000 * bound + 1
    values = [((next(gen) % steps) - 1000 * bound) / 1000 for _ in range(int(np.prod(shape)))]
    return np.array(values, dtype=np.float64).reshape(shape)


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    b, h, kvh, s, t, d = case.batch, case.heads, case.kv_heads, case.seq, case.total, case.head_dim
    base = sum(ord(c) << (8 * (n % 7)) for n, c in enumerate(case.name))
    mask = np.ones((b, t), dtype=np.int64)
    for row, pad in enumerate(case.left_pad):
        mask[row, :pad] = 0
    for value, (row, start, stop) in enumerate(case.runs, start=2):
        mask[row, start:stop] = value
    return {
        "query": _uniform((b, h, s, d), base + 1, 2),
        "key": _uniform((b, kvh, t, d), base + 2, 2),
        "value": _uniform((b, kvh, t, d), base + 3, 1),
        "attention_mask": mask,
    }


# --- the spec's equations, in float64 ----------------------------------------------------------------------


def expected_output(inputs: dict[str, np.ndarray], case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The output (float64) and the [batch, seq] rows with no visible key (output set to 0 there)."""
    q, k, v = (inputs[n].astype(np.float32).astype(np.float64) for n in ("query", "key", "value"))
    group = case.heads // case.kv_heads
    kv_of_head = np.arange(case.heads) // group
    scores = np.einsum("bhsd,bhtd->bhst", q, k[:, kv_of_head]) * case.scale
    if case.softcap > 0:
        scores = case.softcap * np.tanh(scores / case.softcap)
    visible = visibility.visible(inputs["attention_mask"], case.seq, case.window, case.causal, case.blocks)[:, None]
    scores = np.where(visible, scores, MASKED)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bhst,bhtd->bhsd", probs, v[:, kv_of_head])
    excluded = ~visible[:, 0].any(axis=-1)  # [b, s]
    out[np.broadcast_to(excluded[:, None, :, None], out.shape)] = 0.0
    return out, excluded


def check_reference(inputs: dict[str, np.ndarray], case: Case, expected: np.ndarray, excluded: np.ndarray) -> float:
    """Largest difference between `attention_reference` (float32) and the expected output on compared rows."""
    import torch

    from gemma_export.ops.attention import attention_reference

    q, k, v = (torch.from_numpy(inputs[n].astype(np.float32)) for n in ("query", "key", "value"))
    mask = torch.from_numpy(inputs["attention_mask"])
    with torch.no_grad():
        args = (case.scale, case.softcap, case.window, bool(case.causal), case.blocks)
        out = attention_reference(q, k, v, mask, *args).numpy()
    keep = ~excluded[:, None, :, None]
    if not np.isfinite(out).all():
        raise AssertionError(f"{case.name}: attention_reference produced a non-finite value")
    return float(np.abs(np.where(keep, out - expected, 0.0)).max())


# --- the file ----------------------------------------------------------------------------------------------


def _float32_text(x: float) -> str:
    text = str(np.float32(x))  # shortest decimal that reads back as the same float32
    return "0.0" if text == "-0.0" else text


def _input_text(x: float) -> str:
    return repr(float(x))


def render(case: Case) -> str:
    inputs = make_inputs(case)
    expected, excluded = expected_output(inputs, case)
    diff = check_reference(inputs, case, expected, excluded)
    if diff > REFERENCE_TOLERANCE:
        raise AssertionError(f"{case.name}: attention_reference differs from the spec by {diff:.3g}")

    inline: dict[str, str] = {}  # lists written on one line, in place of their "@key@" placeholders

    def one_line(key: str, items: list, fmt=str) -> str:
        inline[key] = "[" + ", ".join(fmt(x) for x in items) + "]"
        return f"@{key}@"

    def tensor(name: str, values: np.ndarray, dtype: str, fmt) -> dict:
        return {
            "dtype": dtype,
            "shape": one_line(f"{name}.shape", list(values.shape)),
            "data": one_line(f"{name}.data", values.reshape(-1).tolist(), fmt),
        }

    doc = {
        "op": OP,
        "version": OP_VERSION,
        "name": case.name,
        "description": case.description,
        "attributes": {
            "scale": case.scale,
            "softcap": case.softcap,
            "window": case.window,
            "causal": case.causal,
            "kv_num_heads": case.kv_heads,
            **({"blocks": case.blocks} if case.blocks else {}),
        },
        "inputs": {
            "query": tensor("query", inputs["query"], "float32", _input_text),
            "key": tensor("key", inputs["key"], "float32", _input_text),
            "value": tensor("value", inputs["value"], "float32", _input_text),
            "attention_mask": tensor("attention_mask", inputs["attention_mask"], "int64", str),
        },
        "output": tensor("output", expected, "float32", _float32_text),
        "excluded_rows": one_line("excluded_rows", [f"[{b}, {i}]" for b, i in zip(*np.nonzero(excluded), strict=True)]),
    }
    text = json.dumps(doc, indent=1)
    for key, values in inline.items():
        text = text.replace(f'"@{key}@"', values)
    return text + "\n"


def write_vectors(out: Path = VECTORS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case in CASES:
        path = out / f"{case.name}.json"
        path.write_text(render(case))
        written.append(path)
    stale = {p.name for p in out.glob("*.json")} - {p.name for p in written}
    if stale:
        print(f"note: files not generated by this script: {', '.join(sorted(stale))}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=VECTORS, help=f"output folder (default: {VECTORS})")
    args = parser.parse_args()
    paths = write_vectors(args.out)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} vectors, {size / 1024:.0f} KiB, to {args.out}")


if __name__ == "__main__":
    main()
