"""What a decoder carries from one call to the next, described once for trace, manifest and runtimes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StateSpec:
    input: str  # graph input, e.g. past_key_values.0.key
    output: str  # graph output that feeds it on the next call, e.g. present.0.key
    shape: tuple[int | str, ...]  # before the first call; "batch" on axis 0
    dtype: torch.dtype
    grows: int | None = None  # axis that grows by the new tokens (a full KV cache); None = fixed size

    def empty(self, batch: int) -> torch.Tensor:
        return torch.zeros([batch if d == "batch" else d for d in self.shape], dtype=self.dtype)

    def to_json(self) -> dict:
        return {"input": self.input, "output": self.output, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
