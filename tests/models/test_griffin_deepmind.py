"""Our RecurrentGemma reference against google-deepmind/recurrentgemma's own PyTorch Griffin (an oracle written
by the model's authors, independent of transformers): prefill logits, left padding, packed documents, and
cache-based greedy decoding. See tests/deepmind_oracle.py for the weight mapping and the window convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_export.checkpoint.load import load_model
from gemma_export.runtime.session import generate, left_pad, positions
from gemma_export.verify.reference import TorchDecoder
from tests.support.deepmind_oracle import import_deepmind, to_deepmind

WINDOW = 8
TOL = 1e-4


def _write_checkpoint(path, **overrides):
    """A tiny random RecurrentGemma written by transformers: its default init, plus random norms (so the
    (1 + w) offset matters) and random biases (zero by default, which would hide a swapped bias)."""
    import transformers

    config = transformers.RecurrentGemmaConfig(
        num_hidden_layers=6,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=192,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_window_size=WINDOW,
        **overrides,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.RecurrentGemmaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(path)
    return load_model(path)[1]


@pytest.fixture(scope="module")
def griffin(tmp_path_factory):
    import_deepmind()
    return _write_checkpoint(tmp_path_factory.mktemp("griffin") / "ckpt")


@pytest.fixture(scope="module")
def recurrent_only(tmp_path_factory):
    """Every layer recurrent: our attention does not segment packed documents (deepmind's does)."""
    import_deepmind()
    return _write_checkpoint(tmp_path_factory.mktemp("griffin_recurrent") / "ckpt", block_types=["recurrent"])


def _ours(model, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    decoder = TorchDecoder(model)
    return decoder.step(ids, mask, pos, decoder.empty_cache(ids.shape[0]))[0]


def _theirs(dm, ids: np.ndarray, pos: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits, _ = dm(torch.from_numpy(ids), torch.from_numpy(pos), return_cache=False)
    return logits.numpy()


def _tokens(seed: int, *lengths: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, n).tolist() for n in lengths]


def test_mapping_fills_every_deepmind_parameter(griffin):
    dm = to_deepmind(griffin)  # raises if a deepmind parameter is left unmapped or a shape differs
    for name, p in dm.state_dict().items():
        assert not p.is_meta and torch.isfinite(p).all(), name
    assert dm.config.block_types[2] == import_deepmind().TemporalBlockType.ATTENTION


def test_logits_match_deepmind(griffin):
    ids = np.array(_tokens(3, 2 * WINDOW + 5, 2 * WINDOW + 5), np.int64)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    ours = _ours(griffin, ids, np.ones_like(ids), pos)
    theirs = _theirs(to_deepmind(griffin), ids, pos)
    assert np.abs(ours - theirs).max() <= TOL


def test_deepmind_window_counts_one_key_more(griffin):
    """Given the same `attention_window_size`, deepmind attends window + 1 keys (`q <= k + window`) where we and
    transformers attend `window` (the query's own key included): the results agree before position `window` and
    differ from there on. `to_deepmind` compensates by giving deepmind `window - 1`."""
    ids = np.array(_tokens(3, 2 * WINDOW + 5), np.int64)
    pos = np.arange(ids.shape[1])[None]
    ours = _ours(griffin, ids, np.ones_like(ids), pos)
    literal = _theirs(to_deepmind(griffin, literal_window=True), ids, pos)
    per_position = np.abs(ours - literal).max(axis=(0, 2))
    assert per_position[:WINDOW].max() <= TOL
    assert per_position[WINDOW:].min() > 1e-2


def test_left_padding_matches_deepmind_and_each_row_alone(griffin):
    prompts = _tokens(5, 2 * WINDOW + 5, WINDOW - 3)
    ids, mask = left_pad(prompts, pad_id=0)
    pos = positions(mask)  # pads at 1, each row's first real token at 0: deepmind cuts the pads off there
    ours = _ours(griffin, ids, mask, pos)
    theirs = _theirs(to_deepmind(griffin), ids, pos)
    real = mask.astype(bool)
    assert np.abs(ours - theirs)[real].max() <= TOL
    for row, prompt in enumerate(prompts):
        alone = _ours(griffin, np.array([prompt]), np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
        assert np.abs(ours[row, real[row]] - alone[0]).max() <= 1e-5


def test_packed_documents_reset_like_deepmind(recurrent_only):
    """One row of three documents (the middle one shorter than the Conv1D): the RG-LRU state and the Conv1D's
    view of earlier tokens are cut at each position 0, as deepmind cuts them."""
    lengths = (7, 2, 2 * WINDOW)
    ids = np.concatenate(_tokens(7, *lengths))[None].astype(np.int64)
    pos = np.concatenate([np.arange(n) for n in lengths])[None]
    ours = _ours(recurrent_only, ids, np.ones_like(ids), pos)
    theirs = _theirs(to_deepmind(recurrent_only), ids, pos)
    assert np.abs(ours - theirs).max() <= TOL
    # The resets matter: without them the later documents would read the earlier ones.
    unpacked = _ours(recurrent_only, ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    assert np.abs(unpacked - theirs)[:, lengths[0] :].max() > 1e-2


def _decode_deepmind(dm, prompts, steps):
    """Greedy decoding with deepmind's cache: one forward pass over the (left-padded) prompts, then one token at
    a time with `cache=` (its Conv1D and attention accept only single tokens once a cache exists)."""
    ids, mask = left_pad(prompts, pad_id=0)
    pos = torch.from_numpy(positions(mask))
    tokens, logits_seen = [], []
    with torch.inference_mode():
        logits, cache = dm(torch.from_numpy(ids), pos, return_cache=True)
        p = pos[:, -1:]
        for _ in range(steps):
            last = logits[:, -1]
            logits_seen.append(last.numpy())
            nxt = last.argmax(-1, keepdim=True)
            tokens.append(nxt[:, 0].numpy())
            p = p + 1
            logits, cache = dm(nxt, p, cache=cache, return_cache=True)
    return np.stack(tokens, 1), np.stack(logits_seen, 1)


def _decode_ours(model, prompts, steps):
    """`runtime.generate`'s loop (greedy, no end of sequence), keeping the logits."""
    decoder = TorchDecoder(model)
    ids, mask = left_pad(prompts, pad_id=0)
    pos = positions(mask)
    cache = decoder.empty_cache(len(prompts))
    tokens, logits_seen = [], []
    for _ in range(steps):
        logits, cache = decoder.step(ids, mask, pos, cache)
        last = logits[:, -1]
        logits_seen.append(last)
        tokens.append(last.argmax(-1))
        ids = tokens[-1][:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
    return np.stack(tokens, 1), np.stack(logits_seen, 1)


def test_cached_greedy_decoding_matches_deepmind(griffin):
    prompts = _tokens(11, 5, WINDOW + 5)
    steps = 3 * WINDOW
    theirs_tokens, theirs_logits = _decode_deepmind(to_deepmind(griffin), prompts, steps)
    ours_tokens, ours_logits = _decode_ours(griffin, prompts, steps)
    assert np.abs(ours_logits - theirs_logits).max() <= TOL
    assert (ours_tokens == theirs_tokens).all()
    assert generate(TorchDecoder(griffin), prompts, steps) == ours_tokens.tolist()


def test_cached_decoding_after_a_prompt_shorter_than_the_conv(griffin):
    """A 2-token prompt left-padded beside a longer one: the Conv1D tail handed to the next step must not
    carry a pad's input (a regression test: it once did, since the step has no reset to cut it off)."""
    prompts = _tokens(13, 2, WINDOW + 5)
    _, theirs_logits = _decode_deepmind(to_deepmind(griffin), prompts, 4)
    _, ours_logits = _decode_ours(griffin, prompts, 4)
    _, alone_logits = _decode_ours(griffin, prompts[:1], 4)
    assert np.abs(alone_logits[0] - theirs_logits[0]).max() <= TOL  # deepmind computes the row as if alone
    assert np.abs(ours_logits - theirs_logits).max() <= TOL
