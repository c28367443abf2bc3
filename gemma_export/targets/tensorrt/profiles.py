"""Optimization profiles: the (min, opt, max) of every dynamic dimension an engine accepts.

A TensorRT engine serves only the shapes its profile admits. The graph's symbolic dimensions (the artifact
contract, README) map onto three axes the user or the recipe sizes:

    batch                    -> batch
    sequence_length          -> sequence (new tokens per call: the prompt, then 1 per decode step)
    past_sequence_length     -> past (cached positions; RecurrentGemma's state has none, it is fixed-size)
    total_sequence_length    -> past + sequence

`--profile batch=1:1:8 --profile sequence=1:128:1024` overrides an axis; the recipe's [build.tensorrt.profile]
gives the defaults, else DEFAULTS, capped so that past + sequence never exceeds the model's max_length.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gemma_export.errors import BadInput

AXES = ("batch", "sequence", "past")
DEFAULTS = {"batch": (1, 1, 4), "sequence": (1, 128, 1024), "past": (0, 128, 4096)}
DIMS = {"batch": "batch", "sequence_length": "sequence", "past_sequence_length": "past"}
TOTAL = "total_sequence_length"

Range = tuple[int, int, int]


def parse(given: Iterable[str]) -> dict[str, Range]:
    """`AXIS=MIN:OPT:MAX` strings -> {axis: (min, opt, max)}; one-line errors."""
    out: dict[str, Range] = {}
    for text in given:
        axis, _, values = text.partition("=")
        parts = values.split(":")
        if axis not in AXES or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise BadInput(f"--profile {text!r}: expected AXIS=MIN:OPT:MAX with AXIS one of {', '.join(AXES)} "
                           "and three integers (e.g. batch=1:1:8)")  # fmt: skip
        out[axis] = check(axis, tuple(int(p) for p in parts), f"--profile {text}")
    return out


def check(axis: str, value: Any, where: str) -> Range:
    lo, opt, hi = value
    floor = 0 if axis == "past" else 1
    if not floor <= lo <= opt <= hi:
        raise BadInput(f"{where}: need {floor} <= min <= opt <= max, got {lo}:{opt}:{hi}")
    return (lo, opt, hi)


def resolve(given: Mapping[str, Range], recipe: Mapping[str, Any] | None, max_length: int) -> dict[str, Range]:
    """Every axis's range: the option's, else the recipe's, else the default capped to the model's length."""
    out: dict[str, Range] = {}
    for axis in AXES:
        if axis in given:
            out[axis] = given[axis]
        elif recipe and axis in recipe:
            out[axis] = check(axis, recipe[axis], f"recipe [build.tensorrt.profile] {axis}")
        else:
            lo, opt, hi = DEFAULTS[axis]
            if axis == "sequence":  # at most half the length, so that a past fits beside it
                hi = min(hi, max(1, max_length // 2))
            elif axis == "past":
                hi = max(0, min(hi, max_length - out["sequence"][2]))
            out[axis] = (min(lo, hi), min(opt, hi), hi)
    if out["past"][2] + out["sequence"][2] > max_length:
        raise BadInput(f"profile past max {out['past'][2]} + sequence max {out['sequence'][2]} exceeds the model's "
                       f"max_length {max_length}")  # fmt: skip
    return out


def input_shapes(inputs: Iterable[Mapping[str, Any]], ranges: Mapping[str, Range]) -> dict[str, list[list[int]]]:
    """{input name: [min shape, opt shape, max shape]} of every graph input with a shape (the manifest's
    `inputs` entries); a scalar input (logits_to_keep) is an initializer TensorRT folds, so it has none."""
    total = tuple(ranges["past"][i] + ranges["sequence"][i] for i in range(3))
    shapes: dict[str, list[list[int]]] = {}
    for spec in inputs:
        dims = spec["shape"]
        if not dims or spec.get("optional"):
            continue
        rows = [[], [], []]
        for dim in dims:
            for i in range(3):
                if isinstance(dim, int):
                    rows[i].append(dim)
                elif dim == TOTAL:
                    rows[i].append(total[i])
                elif dim in DIMS:
                    rows[i].append(ranges[DIMS[dim]][i])
                else:
                    raise ValueError(f"input {spec['name']}: no profile axis for dimension {dim!r}")
        shapes[spec["name"]] = rows
    return shapes
