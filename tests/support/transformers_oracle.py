"""transformers as the oracle: logits and greedy generation on left-padded batches."""

from __future__ import annotations

import numpy as np
import torch

from gemma_export.runtime.session import left_pad
from gemma_export.verify.passes import sample_prompts


def hf_logits(hf_model, prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.float().numpy(), mask


def long_and_padded(cfg) -> list[list[int]]:
    """A left-padded batch: one row past twice the window, one short."""
    prompts = sample_prompts(cfg)
    return [prompts["long"][0], prompts["padded_batch"][1]]


def hf_greedy(hf_model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """transformers' generate on a left-padded batch: exactly `new_tokens` greedy tokens per row."""
    ids, mask = left_pad(prompts, pad_id)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return out[:, ids.shape[1] :].tolist()
