"""The PyTorch reference behind the same interfaces as the artifact (`runtime.session.Decoder`, `OrtEncoder`'s
`embed`): the verify stage drives both with the same inputs."""

from __future__ import annotations

import numpy as np

from gemma_export.runtime.session import Cache


class TorchDecoder:
    """The PyTorch reference model (any `gemma_export.models` decoder)."""

    def __init__(self, model) -> None:
        self.model = model.eval()
        self.vocab_size = model.cfg.vocab_size

    def empty_cache(self, batch: int) -> Cache:
        return [spec.empty(batch).numpy() for spec in self.model.state_specs()]

    def reserve(self, length: int) -> None:
        pass  # its caches grow by concatenation

    def step(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=0, **extra):
        """`extra`: a multimodal decoder's token_type_ids and image_features (none given: a text step)."""
        import torch

        if not self.model.mask_covers_past:
            attention_mask = attention_mask[:, -input_ids.shape[1] :]
        args = (torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(position_ids))
        kwargs = {}
        if getattr(self.model, "extra_inputs", ()):
            hidden = self.model.cfg.hidden_size
            extra.setdefault("token_type_ids", np.zeros_like(attention_mask))
            extra.setdefault("image_features", np.zeros((0, hidden), np.float32))
            kwargs = {name: torch.from_numpy(np.ascontiguousarray(extra[name])) for name in self.model.extra_inputs}
        with torch.inference_mode():
            logits, state = self.model(*args, [torch.from_numpy(c) for c in cache], **kwargs)
        logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        return logits.numpy(), [t.numpy() for t in state]


class TorchEncoder:
    """The PyTorch reference EmbeddingGemma."""

    def __init__(self, model) -> None:
        self.model = model.eval()

    def embed(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            e, tokens = self.model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return e.numpy(), tokens.numpy()
