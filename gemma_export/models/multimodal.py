"""Gemma 3's and PaliGemma's decoder with image prompts: the text decoder (models/gemma.py) whose input
embeddings take the projected image features (models/siglip.py) at the image-token positions, and whose
attention lets the tokens of one image (PaliGemma: of the prompt) see each other.

    x_0  = embed(ids) * sqrt(hidden), except at image tokens (id = image_token_id): the next image feature row
           as it is (no sqrt(hidden) scale; features are consumed in row-major order of the [batch, seq] ids;
           an image token beyond the features given, e.g. one the model generates, keeps its text embedding)
    mask = attention_mask * (1 + block): block k >= 1 numbers the k-th run of image tokens in a row (from
           `token_type_ids`, 1 at image tokens, as transformers' processor writes it), so the op's rule
           (ops/visibility.py) makes each image bidirectional; text stays causal. Gemma 3's windows bound the
           blocks too: AND(window, OR(causal, block)), the op's `blocks` 1.

PaliGemma (1 and 2; `PaliGemmaForConditionalGeneration`) is the same decoder (a Gemma or Gemma 2 text model)
with two traits, its configuration here:
    prefix-LM   the image tokens, bos, the prompt and "\n" (the prefix: transformers' token_type_ids == 0) attend
                to each other bidirectionally, the suffix (generated tokens) causally. Our `token_type_ids`
                marks the bidirectional tokens with 1, so for PaliGemma it is 1 over the whole prompt (the
                inverse of transformers' convention): one run, one block, mask value 2. The prefix sees all
                of itself in the sliding layers too, however long: transformers' PaliGemma composes
                OR(AND(window, causal), block) (`create_sliding_window_causal_mask` with block_sequence_ids),
                the op's `blocks` 2.
    positions   1-indexed: transformers' PaliGemma adds 1 to the position ids it is given or computes
                (`position_offset` = 1), so the runtime's positions stay the text decoders'. RoPE sees only
                distances, so this shifts rounding, not the result: it is kept to mirror transformers.

The graph signature is the text decoder's (README "Artifact contract": the same KV cache) plus
    token_type_ids  int64   [batch, total_sequence_length]   1 at image tokens (PaliGemma: at the prompt's
                                                              tokens; past + new), else 0
    image_features  float32 [num_image_tokens, hidden]        the vision graph's output rows of this call's
                                                              image tokens, in order ([0, hidden]: none)
"""

from __future__ import annotations

import torch
from torch import nn

from gemma_export.errors import BadInput
from gemma_export.models.gemma import GemmaModel
from gemma_export.models.layers import softcap, tied_lm_head
from gemma_export.ops.visibility import BLOCKS_IN_WINDOW


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[batch, total]: 0 for text, k for the k-th run of image tokens in the row (transformers'
    `get_block_sequence_ids_for_mask`, numbered from 1 instead of 0, text 0 instead of -1)."""
    is_image = token_type_ids == 1
    before = torch.cat((torch.zeros_like(is_image[:, :1]), is_image[:, :-1]), dim=1)
    starts = (is_image & ~before).to(torch.int64)
    return torch.where(is_image, starts.cumsum(1), torch.zeros_like(starts))


def place_image_features(x: torch.Tensor, is_image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, hidden] with the image-token positions (row-major) taking `features` [n, hidden] rows."""
    batch, seq, hidden = x.shape
    flat = is_image.reshape(-1)
    index = flat.to(torch.int64).cumsum(0)  # the k-th image token takes row k of [zeros; features]
    use = flat & (index <= features.shape[0])
    table = torch.cat((features.new_zeros(1, hidden), features.to(x.dtype)), dim=0)
    rows = table[torch.where(use, index, torch.zeros_like(index))].reshape(batch, seq, hidden)
    return torch.where(use.reshape(batch, seq, 1), rows, x)


class Gemma3MultimodalDecoder(nn.Module):
    """The text decoder with image features in its input embeddings and image blocks in its attention."""

    mask_covers_past = True
    extra_inputs = ("token_type_ids", "image_features")

    def __init__(
        self, decoder: GemmaModel, image_token_id: int, position_offset: int = 0, blocks: int = BLOCKS_IN_WINDOW
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.cfg = decoder.cfg
        self.image_token_id = image_token_id
        self.position_offset = position_offset  # PaliGemma: 1
        for layer in decoder.layers:  # how a block meets a sliding window (ops/visibility.py); PaliGemma: 2
            layer.self_attn.blocks = blocks

    @property
    def cache_layout(self) -> str:
        return self.decoder.cache_layout

    def use_cache_layout(self, layout: str) -> Gemma3MultimodalDecoder:
        if layout != "full":
            raise BadInput("--cache-layout windowed is not supported with images (a vision artifact: use full)")
        self.decoder.use_cache_layout(layout)
        return self

    def state_specs(self):
        return self.decoder.state_specs()

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq] int64
        attention_mask: torch.Tensor,  # [batch, past + seq] int64, 0 = padding
        position_ids: torch.Tensor,  # [batch, seq] int64
        state: list[torch.Tensor],
        token_type_ids: torch.Tensor,  # [batch, past + seq] int64, 1 = an image token
        image_features: torch.Tensor,  # [image tokens of this call, hidden] float32
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        is_image = input_ids == self.image_token_id
        # the image token's own embedding is never used: id 0 keeps the lookup in range whatever the token's id
        x = self.decoder.embed(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        x = place_image_features(x, is_image, image_features)
        mask = attention_mask * (1 + image_blocks(token_type_ids))
        x, presents = self.decoder.run_layers(x, mask, position_ids + self.position_offset, state)
        logits = softcap(tied_lm_head(x, self.decoder.embed_tokens.weight), self.cfg.final_logit_softcapping)
        return logits, presents
