"""Calibrate stage (`--quant int4-gptq`): GPTQ of every projection on the fp32 reference model, before the quantize
stage writes the graph's MatMulNBits weights from the result (quantize.py).

Data flows one way. In: the reference model (left exactly as it was: the verify stage compares against it),
the checkpoint's tokenizer and a calibration text. Out: `gptq.Calibrated`, each projection's codes, scales and
zero points keyed by its MatMul node's name, which is the module's name in the reference (`layers.3.mlp.up_proj`,
as trace.name_projections names the node).

The text is cut into `sequence_length`-token sequences, each starting with <bos>, `tokens` in all, in the
text's order (deterministic). Layers are quantized in order, each on the outputs of the layers already
quantized (errors do not compound unseen), and within a layer one group of projections at a time, a group
being the projections that read the same input (q/k/v; gate/up; RecurrentGemma's linear_x/y), so that o_proj
is calibrated on the output of the quantized q/k/v ("true sequential"). While a layer is worked on, its
quantized projections stand in the reference as new Parameters; the reference's own are put back at the end,
never written to.

Gemma's decoder layers are modules called with their inputs, so each layer is re-run alone on its inputs, kept
from the layer before. A model whose layers are not modules called that way (RecurrentGemma's loop calls
their blocks) is re-run from the start for each group: the same result, slower (quadratic in depth).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gemma_export.checkpoint import tokenizer
from gemma_export.errors import BadInput
from gemma_export.pipeline import gptq
from gemma_export.pipeline.quantize import QuantSpec

BUILT_IN_TEXT = Path(__file__).with_name("calibration.txt")
MIN_TOKENS = 256  # a shorter text calibrates nothing reliably


class _Stop(Exception):
    """Raised by a hook once what a pass needed has been seen: the rest of the forward is skipped."""


def calibration_text(path: Path | None) -> tuple[str, dict[str, Any]]:
    """The text (the built-in one, or a UTF-8 file) and its manifest record: source and sha256 of its bytes."""
    source = BUILT_IN_TEXT if path is None else Path(path)
    try:
        data = source.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--calibration {path}: not a readable UTF-8 text file ({type(e).__name__})") from None
    name = "built-in" if path is None else source.name  # a file name, not a path: the manifest stays portable
    return text, {"source": name, "sha256": hashlib.sha256(data).hexdigest()}


def tokenizer_of(checkpoint_dir: Path) -> Any:
    """The checkpoint's `tokenizers.Tokenizer` (checkpoint/tokenizer.py), which calibration cannot do without."""
    found = tokenizer.find(checkpoint_dir)
    if found is None:
        raise BadInput(f"{checkpoint_dir}: --quant int4-gptq calibrates on text and needs the checkpoint's "
                       "tokenizer (tokenizer.json); --quant int4 needs none")  # fmt: skip
    return found


def token_sequences(ids: list[int], bos: int, length: int, tokens: int) -> torch.Tensor:
    """[n, length] int64: <bos> then the next length - 1 tokens of the text, in order, up to `tokens` in all.
    A text shorter than one sequence gives one shorter sequence."""
    body = [t for t in ids if t != bos]
    if len(body) + 1 < MIN_TOKENS:
        raise BadInput(f"the calibration text has {len(body) + 1} tokens; it needs at least {MIN_TOKENS}")
    step = min(length, len(body) + 1) - 1
    count = max(1, min(-(-tokens // length), len(body) // step))
    rows = [[bos, *body[i * step : (i + 1) * step]] for i in range(count)]
    return torch.tensor(rows, dtype=torch.int64)


@torch.no_grad()
def calibrate(model: nn.Module, sequences: torch.Tensor, spec: QuantSpec, text_record: dict[str, Any],
              report: Callable[[str], None] | None = None) -> gptq.Calibrated:  # fmt: skip
    """GPTQ of every Linear in `model.layers`, calibrated on `sequences` [n, length]; the model is unchanged."""
    settings = spec.gptq
    if settings is None:
        raise ValueError("calibrate needs a GPTQ QuantSpec")
    linears = {name: m for name, m in model.named_modules() if name.startswith("layers.") and isinstance(m, nn.Linear)}
    weights: dict[str, gptq.QWeight] = {}
    with _standing_in(linears) as stand_in:
        runner = _Runner(model, sequences)
        for i in range(len(model.layers)):
            for group in runner.groups(i, linears):
                hessians = runner.hessians(i, {name: linears[name] for name in group})
                for name in group:
                    width = spec.width_of(name)
                    if width.symmetric:
                        raise ValueError(f"{name}: GPTQ here writes asymmetric weights only")
                    weights[name] = gptq.gptq(linears[name].weight, hessians[name], width.bits, width.block_size,
                                              settings.range_steps, settings.damp, settings.act_order)  # fmt: skip
                    stand_in(name, weights[name].dequantize())
            runner.advance(i)
            if report is not None:
                report(f"calibrate: layer {i + 1}/{len(model.layers)} quantized")
    record = {
        "gptq": asdict(settings) | {"sequence_length": sequences.shape[1]},
        "calibration": {**text_record, "tokens": sequences.numel(), "sequences": sequences.shape[0]},
    }
    return gptq.Calibrated(weights, {name: m.weight for name, m in linears.items()}, record)


@contextmanager
def _standing_in(linears: dict[str, nn.Linear]) -> Iterator[Callable[[str, torch.Tensor], None]]:
    """Lets a quantized weight stand in for a Linear's own; every one is put back on leaving (even on error)."""
    originals: dict[str, nn.Parameter] = {}

    def stand_in(name: str, weight: torch.Tensor) -> None:
        module = linears[name]
        originals.setdefault(name, module.weight)
        module.weight = nn.Parameter(weight.to(module.weight.dtype), requires_grad=False)

    try:
        yield stand_in
    finally:
        for name, weight in originals.items():
            linears[name].weight = weight


class _Runner:
    """Runs the calibration sequences up to a layer's projections: the layer alone on its kept inputs when the
    model calls its layers as modules (Gemma), else the whole model from the start (RecurrentGemma)."""

    def __init__(self, model: nn.Module, sequences: torch.Tensor) -> None:
        self.model, self.sequences = model, sequences
        self.layers = list(model.layers)
        # per sequence, each layer's (args, kwargs); the hidden states (args[0]) only for the layer to run next
        self.calls: list[list[tuple[tuple, dict]]] = [self._layer_calls(0)]
        self.per_layer = len(self.calls[0]) == len(self.layers)
        if self.per_layer:
            self.calls += [self._layer_calls(row) for row in range(1, sequences.shape[0])]

    def _forward(self, row: int, length: int | None = None) -> None:
        ids = self.sequences[row : row + 1, :length]
        mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
        state = [spec.empty(1) for spec in self.model.state_specs()]
        with suppress(_Stop):
            self.model(ids, mask, positions, state)

    def _layer_calls(self, row: int) -> list[tuple[tuple, dict]]:
        """Each layer's arguments on one sequence (the first's hidden states; the others' are replaced as the
        layers before are quantized), from a forward stopped at the last layer; none if layers are not called."""
        calls: list[tuple[tuple, dict]] = []

        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((args if not calls else (None, *args[1:]), kwargs))
            if module is self.layers[-1]:
                raise _Stop

        handles = [layer.register_forward_pre_hook(keep, with_kwargs=True) for layer in self.layers]
        try:
            self._forward(row)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    def _run(self, i: int) -> Iterator[None]:
        """Feeds every sequence to layer i (a _Stop from a hook ends that sequence's pass)."""
        for row in range(self.sequences.shape[0]):
            try:
                if self.per_layer:
                    args, kwargs = self.calls[row][i]
                    self.layers[i](*args, **kwargs)
                else:
                    self._forward(row)
            except _Stop:
                pass
            yield

    def groups(self, i: int, linears: dict[str, nn.Linear]) -> list[list[str]]:
        """Layer i's projections in the order they are called, those called on the same input tensor together."""
        mine = {name: m for name, m in linears.items() if name.startswith(f"layers.{i}.")}
        groups: list[list[str]] = []
        last: list[torch.Tensor | None] = [None]  # the previous call's input, kept alive so identity means sameness

        def record(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                if groups and args[0] is last[0]:
                    groups[-1].append(name)
                elif name not in {n for g in groups for n in g}:
                    groups.append([name])
                last[0] = args[0]
                if sum(map(len, groups)) == len(mine):
                    raise _Stop

            return hook

        handles = [m.register_forward_pre_hook(record(name)) for name, m in mine.items()]
        try:
            next(self._run(i))  # the first sequence: the call order does not depend on the data
        finally:
            for handle in handles:
                handle.remove()
        return groups

    def hessians(self, i: int, group: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """2/n X^T X (float64) of each projection's inputs X over every calibration position."""
        sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in group.items()}
        seen: set[str] = set()
        rows = [0]

        def accumulate(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sums[name] += (x.T @ x).double()
                if not seen:
                    rows[0] += x.shape[0]
                seen.add(name)
                if len(seen) == len(group):
                    raise _Stop

            return hook

        handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in group.items()]
        try:
            for _ in self._run(i):
                seen.clear()
        finally:
            for handle in handles:
                handle.remove()
        return {name: 2 * s / rows[0] for name, s in sums.items()}

    def advance(self, i: int) -> None:
        """Layer i's outputs (its projections quantized) become layer i + 1's inputs."""
        if not self.per_layer or i + 1 == len(self.layers):
            return
        for calls in self.calls:
            args, kwargs = calls[i]
            out = self.layers[i](*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            next_args, next_kwargs = calls[i + 1]
            calls[i + 1] = ((hidden, *next_args[1:]), next_kwargs)
            calls[i] = ((None, *args[1:]), kwargs)  # its hidden states are no longer needed
