"""The attention op's conformance vectors (graphs/attention/vectors/*.json): reading them and comparing rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support import ROOT

VECTOR_DIR = ROOT / "graphs" / "attention" / "vectors"


VECTORS = sorted(VECTOR_DIR.glob("*.json"))


INPUTS = ("query", "key", "value", "attention_mask")


ATTRIBUTES = ("scale", "softcap", "window", "causal", "kv_num_heads")


DTYPES = {"float32": np.float32, "int64": np.int64}


def load_vector(path: Path) -> dict:
    raw = json.loads(path.read_text())
    tensors = {**raw["inputs"], "output": raw["output"]}
    arrays = {n: np.array(t["data"], dtype=DTYPES[t["dtype"]]).reshape(t["shape"]) for n, t in tensors.items()}
    excluded = np.zeros(arrays["query"].shape[0:1] + arrays["query"].shape[2:3], dtype=bool)
    for b, i in raw["excluded_rows"]:
        excluded[b, i] = True
    return {"attributes": raw["attributes"], "arrays": arrays, "excluded": excluded}


def row_error(actual: np.ndarray, expected: np.ndarray, excluded: np.ndarray) -> float:
    """Largest difference over the compared rows; every row, excluded or not, must be finite."""
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all()
    keep = ~excluded[:, None, :, None]
    return float(np.abs(np.where(keep, actual.astype(np.float64) - expected, 0.0)).max(initial=0.0))
