"""GPTQ (Frantar et al., 2022) for one weight, emitting exactly what ONNX Runtime's `MatMulNBits` stores.

A torch Linear's weight is W [N = out, K = in]; MatMulNBits cuts each output row into blocks of `block_size`
input features, each with a float32 scale and an integer zero point, and computes with
(code - zero_point) * scale. Round-to-nearest picks each code alone; GPTQ picks them one input feature at a
time and moves the rounding error onto the features not yet rounded, weighted by the inverse Hessian
H = 2/n X^T X of the layer's calibration inputs X, which minimises the error of the layer's *output*
||X W^T - X Q^T|| rather than of the weight. That is what lets int4 keep the model (README "Weight
quantization"). Settings, as measured on the real Gemma-3-270M (README "Real checkpoints"):

* grid: ONNX Runtime's asymmetric one (min and max of the block, both widened to include 0), with the range
  shrunk per block by the factor in [0.6, 1] that minimises the diag(H)-weighted squared error (`range_steps`
  factors tried; 0: none). Alone this halves round-to-nearest's loss; GPTQ then halves the rest.
* static groups: every block's grid is fixed from the original W first; with act_order the features are then
  quantized in decreasing diag(H) order (the most used first, while the others can still absorb its error),
  and the stored layout stays MatMulNBits' contiguous blocks.
* damp: 1% of mean(diag(H)) added to H's diagonal, so that it inverts.

Asymmetric widths only (every `--quant` default is): a symmetric MatMulNBits weight drops its zero points,
which this grid does not leave at the midpoint. Everything is deterministic (no sampling; float64 Hessian).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

MIN_SHRINK = 0.6  # the narrowest range the grid search tries, as a fraction of the block's min..max
LAZY_BATCH = 128  # features updated together before the rest of W is (the paper's lazy batch; speed only)


@dataclass(frozen=True)
class QWeight:
    """A quantized Linear weight: codes [N, K'] (K' = K padded to whole blocks), scales and zero points
    [N, K' / block_size]; the weight it stands for is (codes - zero_points) * scales per block."""

    codes: torch.Tensor  # uint8, 0 .. 2^bits - 1
    scales: torch.Tensor  # float32
    zero_points: torch.Tensor  # uint8
    bits: int
    block_size: int
    in_features: int  # K: MatMulNBits pads the last block with zeros, which dequantize to exactly 0

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight MatMulNBits computes with."""
        n, k_padded = self.codes.shape
        blocks = self.codes.view(n, -1, self.block_size).float() - self.zero_points.float()[..., None]
        return (blocks * self.scales[..., None]).reshape(n, k_padded)[:, : self.in_features]

    def pack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """MatMulNBits' initializers, laid out as ONNX Runtime's quantizer writes them: B uint8
        [N, k_blocks, block_size * bits / 8] (4 bits: the even feature in the low nibble), scales float32
        [N, k_blocks], zero points uint8 [N, ceil(k_blocks * bits / 8)] (4 bits: two per byte, each row padded)."""
        n, k_padded = self.codes.shape
        k_blocks = k_padded // self.block_size
        codes = self.codes.numpy().reshape(n, k_blocks, self.block_size)
        zero_points = self.zero_points.numpy()
        if self.bits == 4:
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
            if k_blocks % 2:
                zero_points = np.concatenate([zero_points, np.zeros((n, 1), np.uint8)], axis=1)
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
        elif self.bits != 8:
            raise ValueError(f"MatMulNBits stores 4 or 8 bits here, not {self.bits}")
        return (np.ascontiguousarray(codes, np.uint8), self.scales.numpy().astype(np.float32),
                np.ascontiguousarray(zero_points, np.uint8))  # fmt: skip


@dataclass(frozen=True)
class Calibrated:
    """What the calibrate stage hands the quantize stage: each projection's quantized weight, by the name of its
    MatMul node (`layers.3.mlp.up_proj`, trace.name_projections), and the reference's own weights it was
    computed from (the same tensors, not copies), which the quantize stage checks the graph's against."""

    weights: dict[str, QWeight]
    originals: dict[str, torch.Tensor]
    record: dict[str, Any]  # the manifest's `quantization.gptq` and `quantization.calibration`


def grid(w: torch.Tensor, bits: int, shrink: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX Runtime's asymmetric grid of each row of a block w [N, g]: (scale [N], zero point [N], integral)."""
    top = 2**bits - 1
    low = w.min(dim=1).values.clamp(max=0) * shrink
    high = w.max(dim=1).values.clamp(min=0) * shrink
    scale = (high - low) / top
    safe = torch.where(scale == 0, 1.0, scale)
    zero = torch.where(scale == 0, 0.0, torch.round(-low / safe)).clamp(0, top)
    return scale, zero


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w (a block [N, g], or one feature [N]) to its grid: float codes in 0 .. 2^bits - 1."""
    if w.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    safe = torch.where(scale == 0, 1.0, scale)
    return torch.where(scale == 0, zero, torch.round(w / safe) + zero).clamp(0, 2**bits - 1)


def search_grid(w: torch.Tensor, bits: int, steps: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of each row of w [N, g] whose range, shrunk by one of `steps` + 1 factors in [MIN_SHRINK, 1],
    gives the least squared rounding error, each feature's weighted by `weight` [g] (diag(H): how much the
    layer's output depends on it). Outliers then stop stretching the whole block's grid."""
    scale, zero = grid(w, bits)
    if steps <= 0:
        return scale, zero
    best = torch.full((w.shape[0],), float("inf"))
    for shrink in torch.linspace(1.0, MIN_SHRINK, steps + 1).tolist():
        s, z = grid(w, bits, shrink)
        error = (((codes_of(w, s, z, bits) - z[:, None]) * s[:, None] - w) ** 2 * weight).sum(1)
        better = error < best
        best, scale, zero = (torch.where(better, new, old) for new, old in ((error, best), (s, scale), (z, zero)))
    return scale, zero


def round_to_nearest(w: torch.Tensor, bits: int, block_size: int, steps: int = 0) -> QWeight:
    """Blockwise round-to-nearest of w [N, K] (with the grid search when steps > 0): GPTQ's baseline."""
    hessian = torch.eye(w.shape[1], dtype=torch.float64)
    return _quantize(w, hessian, bits, block_size, steps, damp=0.0, act_order=False, propagate=False)


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, steps: int = 10,
         damp: float = 0.01, act_order: bool = True) -> QWeight:  # fmt: skip
    """GPTQ of w [N, K] given the Hessian [K, K] (2/n X^T X, float64) of the layer's inputs."""
    return _quantize(w, hessian, bits, block_size, steps, damp, act_order, propagate=True)


def _quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int, steps: int, damp: float,
              act_order: bool, propagate: bool) -> QWeight:  # fmt: skip
    n, k = w.shape
    pad = -k % block_size
    # copies (clone): the reference's own weight and the caller's Hessian are never written to
    w = torch.nn.functional.pad(w.detach().float(), (0, pad)).clone()
    h = torch.nn.functional.pad(hessian.double(), (0, pad, 0, pad)).clone()
    dead = torch.diag(h) == 0  # a feature no input ever used (or padding): any code will do; 0 keeps it exact
    h[dead, dead] = 1
    w[:, dead] = 0
    k_padded, blocks = k + pad, (k + pad) // block_size
    importance = torch.diag(h).float()

    # Static groups: every block's grid from the original weight, before any error is moved onto it.
    scales, zeros = torch.empty(n, blocks), torch.empty(n, blocks)
    for b in range(blocks):
        cols = slice(b * block_size, (b + 1) * block_size)
        scales[:, b], zeros[:, b] = search_grid(w[:, cols], bits, steps, importance[cols])
    # stable: equal diag(H) (padding, dead features) keep their order, so the result does not depend on the sort
    order = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(k_padded)
    w, h = w[:, order], h[order][:, order]
    group = order // block_size  # each (reordered) feature's block
    inverse = _inverse_cholesky(h, damp) if propagate else torch.eye(k_padded)

    codes = torch.zeros(n, k_padded)
    for start in range(0, k_padded, LAZY_BATCH):
        stop = min(start + LAZY_BATCH, k_padded)
        batch, errors = w[:, start:stop].clone(), torch.zeros(n, stop - start)
        for i in range(stop - start):
            g = int(group[start + i])
            scale, zero = scales[:, g], zeros[:, g]
            q = codes_of(batch[:, i], scale, zero, bits)
            codes[:, start + i] = q
            if propagate:  # the rounding error, moved onto the features of this batch not yet rounded
                error = (batch[:, i] - (q - zero) * scale) / inverse[start + i, start + i]
                batch[:, i:] -= error[:, None] * inverse[start + i, start + i : stop][None, :]
                errors[:, i] = error
        if propagate:  # ... and onto every later feature, once per batch
            w[:, stop:] -= errors @ inverse[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    return QWeight(codes.to(torch.uint8), scales, zeros.to(torch.uint8), bits, block_size, k)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 (float32), H damped: the paper's numerically stable form."""
    h = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()
