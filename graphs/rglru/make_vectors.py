"""Write the conformance vectors of `ai.gemma::RGLRU` (graphs/rglru.md) to graphs/rglru/vectors/.

    .venv/bin/python graphs/rglru/make_vectors.py [--out DIR]

Each case is one JSON file: the four inputs and the two expected outputs (`y`, `h_last`). The script is
deterministic and independent of library versions:

- inputs come from a self-contained generator (splitmix64): integers n written as the decimal n / 10^k (k = 3
  for most tensors, 9 for the `log_a` of the a -> 1 case); a reader takes each number as written and rounds it
  to the input dtype (float32; `reset` is a JSON boolean);
- the expected outputs are the spec's equations evaluated in float64 (numpy) from the float32-rounded inputs,
  rounded to float32 and written with the shortest repr that round-trips float32. `rglru_reference` (the
  PyTorch face of the op) must agree with them to 1e-6 on every element, or nothing is written.

tests/ops/test_rglru.py regenerates the vectors into a temporary folder and requires the files on disk to be
byte-identical, so the spec, the vectors and the reference cannot drift apart unnoticed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors"
OP = "ai.gemma::RGLRU"
OP_VERSION = 1
REFERENCE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Range:
    """The decimals n / 10^exp for the integers lo <= n <= hi."""

    lo: int
    hi: int
    exp: int = 3


X = Range(-1000, 1000)  # gated input x: [-1, 1]
LOG_A = Range(-1500, -20)  # log_a in [-1.5, -0.02]: a in [0.22, 0.98], the trained model's range and some
H0 = Range(-1000, 1000)  # a carried state
ZERO = Range(0, 0)


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    dims: tuple[int, int, int]  # batch, seq, width
    resets: tuple[tuple[int, ...], ...]  # per batch row: the steps where a document starts (reset = true)
    h0: Range = H0
    x: Range = X
    log_a: Range = LOG_A

    batch = property(lambda self: self.dims[0])
    seq = property(lambda self: self.dims[1])
    width = property(lambda self: self.dims[2])


# fmt: off
CASES = (
    Case("single_document", "one document from step 0 (reset at 0), zero state: a prompt's prefill",
         (1, 8, 4), resets=((0,),), h0=ZERO),
    Case("continuation", "no reset, nonzero h0: a later chunk of the same documents (chunked prefill)",
         (2, 6, 4), resets=((), ())),
    Case("decode", "one step (S = 1) from a nonzero h0: row 0 continues its document, row 1 starts a new one "
         "there (its h0 is dropped and x is not normalised)",
         (2, 1, 6), resets=((), (0,))),
    Case("packed_documents", "documents of 4, 1, 3 and 4 steps packed in one row (resets at 0, 4, 5, 8); the "
         "nonzero h0 is dropped at step 0",
         (1, 12, 4), resets=((0, 4, 5, 8),)),
    Case("reset_drops_state", "reset at step 0 under a large nonzero h0 (|h0| <= 3): the state is dropped, not "
         "decayed; row 1 resets again at step 2",
         (2, 4, 4), resets=((0,), (0, 2)), h0=Range(-3000, 3000)),
    Case("a_near_one", "a -> 1 (log_a in [-2e-6, -5e-7], sqrt(1 - a^2) ~ 1.4e-3): the state is kept almost "
         "unchanged and x (small, |x| <= 0.005) barely enters; a reset at step 4 drops the state and lets x in "
         "unscaled",
         (1, 8, 4), resets=((4,),), x=Range(-5, 5), log_a=Range(-2000, -500, 9)),
    Case("a_near_zero", "a -> 0 (log_a in [-21, -19]): no memory, y = x (sqrt(1 - a^2) = 1 in float32); h0 is "
         "forgotten after one step",
         (1, 6, 4), resets=((),), log_a=Range(-21000, -19000)),
    Case("batch3_resets", "batch 3 with different reset patterns: row 0 one document from step 0, row 1 no reset "
         "(continues h0), row 2 resets at 0, 3, 4 and at the last step",
         (3, 10, 3), resets=((0,), (), (0, 3, 4, 9))),
    Case("long", "S = 64: row 0 one document from step 0, row 1 continues its h0 and starts a new document at "
         "step 40",
         (2, 64, 4), resets=((0,), (40,))),
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


def _uniform(shape: tuple[int, ...], seed: int, r: Range) -> np.ndarray:
    """Decimals n / 10^exp, lo <= n <= hi, as float64 (exactly what the JSON file will say)."""
    gen = _splitmix64(seed)
    steps = r.hi - r.lo + 1
    values = [(r.lo + next(gen) % steps) / 10**r.exp for _ in range(int(np.prod(shape)))]
    return np.array(values, dtype=np.float64).reshape(shape)


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    b, s, w = case.dims
    base = sum(ord(c) << (8 * (n % 7)) for n, c in enumerate(case.name))
    reset = np.zeros((b, s), dtype=bool)
    for row, starts in enumerate(case.resets):
        reset[row, list(starts)] = True
    return {
        "x": _uniform((b, s, w), base + 1, case.x),
        "log_a": _uniform((b, s, w), base + 2, case.log_a),
        "reset": reset,
        "h0": _uniform((b, w), base + 3, case.h0),
    }


# --- the spec's equations, in float64 ----------------------------------------------------------------------


def expected_outputs(inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(y, h_last) in float64. At a reset the previous state is not read at all (graphs/rglru.md)."""
    x, log_a, h0 = (inputs[n].astype(np.float32).astype(np.float64) for n in ("x", "log_a", "h0"))
    reset = inputs["reset"][:, :, None]
    a = np.exp(log_a)
    x_hat = x * np.where(reset, 1.0, np.sqrt(-np.expm1(2.0 * log_a)))  # sqrt(1 - a^2), accurately as a -> 1
    h = h0
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        h = np.where(reset[:, t], x_hat[:, t], a[:, t] * h + x_hat[:, t])
        y[:, t] = h
    return y, h


def check_reference(inputs: dict[str, np.ndarray], y: np.ndarray, h_last: np.ndarray) -> float:
    """Largest difference between `rglru_reference` (float32) and the expected outputs."""
    import torch

    from gemma_export.ops.rglru import rglru_reference

    args = [torch.from_numpy(inputs[n].astype(np.float32)) for n in ("x", "log_a", "h0")]
    with torch.no_grad():
        ry, rh = rglru_reference(args[0], args[1], torch.from_numpy(inputs["reset"]), args[2])
    ry, rh = ry.numpy(), rh.numpy()
    if ry.dtype != np.float32 or rh.dtype != np.float32 or ry.shape != y.shape or rh.shape != h_last.shape:
        raise AssertionError("rglru_reference returned the wrong dtype or shape")
    if not (np.isfinite(ry).all() and np.isfinite(rh).all()):
        raise AssertionError("rglru_reference produced a non-finite value")
    return float(max(np.abs(ry - y).max(), np.abs(rh - h_last).max()))


# --- the file ----------------------------------------------------------------------------------------------


def _float32_text(x: float) -> str:
    text = str(np.float32(x))  # shortest decimal that reads back as the same float32
    return "0.0" if text == "-0.0" else text


def _input_text(x: float) -> str:
    return "0.0" if x == 0 else repr(float(x))


def _bool_text(x: bool) -> str:
    return "true" if x else "false"


def render(case: Case) -> str:
    inputs = make_inputs(case)
    y, h_last = expected_outputs(inputs)
    diff = check_reference(inputs, y, h_last)
    if diff > REFERENCE_TOLERANCE:
        raise AssertionError(f"{case.name}: rglru_reference differs from the spec by {diff:.3g}")

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
        "attributes": {},
        "inputs": {
            "x": tensor("x", inputs["x"], "float32", _input_text),
            "log_a": tensor("log_a", inputs["log_a"], "float32", _input_text),
            "reset": tensor("reset", inputs["reset"], "bool", _bool_text),
            "h0": tensor("h0", inputs["h0"], "float32", _input_text),
        },
        "outputs": {
            "y": tensor("y", y, "float32", _float32_text),
            "h_last": tensor("h_last", h_last, "float32", _float32_text),
        },
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
