"""Which keys a query sees is one rule, gemma_export/ops/visibility.py; the faces written in other IRs follow it.

- the rule itself on small cases written out by hand from graphs/attention.md, and its numpy and torch
  evaluations agree;
- the ONNX function body of `ai.gemma::Attention` (ops/attention.py) computes the same boolean mask, read off
  its inlined graph, on a grid of query lengths, past lengths, windows, causal / bidirectional, left padding,
  image blocks in both modes of the attribute `blocks` (absent, 1: bounded by the window; 2: not);
- so does the ort-cpu lowering's mask (targets/ort_cpu.py `_visibility`), which Attention-23 takes as it is
  and GroupQueryAttention as an additive bias;
- the two block modes are transformers' own sliding masks: PaliGemma's (`blocks` 2) and Gemma 3's (`blocks` 1).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper
from onnx_ir.tape import Tape

from gemma_export.ops import attention as attention_op
from gemma_export.ops.visibility import BLOCK_MODES, BLOCKS_PAST_WINDOW, visible
from gemma_export.pipeline.trace import OPSET
from gemma_export.targets import ort_cpu
from tests.support import op_harness as harness

HEADS, KV_HEADS, HEAD_DIM = 2, 1, 4
QUERY_LENGTHS, PAST_LENGTHS = (1, 3, 5), (0, 2, 6)
WINDOWS = (0, 1, 2, 3, 16)  # 0: none; 16: wider than every total length here
KINDS = [(w, c) for w in WINDOWS for c in (1, 0)]


def masks(total: int) -> np.ndarray:
    """[4, total]: no padding, one padding key, all but the last, and a row with no real key at all."""
    pads = np.array([0, 1, total - 1, total])
    return (np.arange(total)[None] >= pads[:, None]).astype(np.int64)


def block_masks(total: int) -> np.ndarray:
    """[6, total]: `masks` and two rows whose values >= 2 name bidirectional blocks (images), one left-padded."""
    rows = np.array([[1, 2, 2, 2, 1, 3, 3, 1, 1, 4, 4, 4, 4, 1], [0, 0, 5, 5, 5, 5, 5, 1, 1, 1, 6, 6, 1, 1]])
    return np.concatenate((masks(total), rows[:, :total]))


def grid() -> list[tuple[int, int]]:
    return list(itertools.product(QUERY_LENGTHS, PAST_LENGTHS))


# --- the rule ----------------------------------------------------------------------------------------------

# (seq, window, causal, mask row) -> visible [seq, total], written out from graphs/attention.md's wording.
WRITTEN_OUT = [
    ((3, 0, 1, [1, 1, 1]), [[1, 0, 0], [1, 1, 0], [1, 1, 1]]),  # causal: the past and itself
    ((4, 2, 1, [1, 1, 1, 1]), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),  # W keys, itself included
    ((1, 3, 1, [0, 1, 1, 1, 1]), [[0, 0, 1, 1, 1]]),  # decode at position 4 after a past of 4
    ((2, 0, 1, [0, 0, 1, 1]), [[0, 0, 1, 0], [0, 0, 1, 1]]),  # left padding: never a padding key
    ((4, 2, 0, [1, 1, 1, 1]), [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]),  # bidirectional |d| < W
    ((3, 0, 0, [0, 1, 1]), [[0, 1, 1], [0, 1, 1], [0, 1, 1]]),  # bidirectional, global: every real key
    # a block (mask value 2): its tokens see each other, later ones included; text stays causal
    ((4, 0, 1, [1, 2, 2, 1]), [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),
    # ... and the window still bounds how far back (AND(window, OR(causal, block)), transformers' sliding rule)
    ((4, 2, 1, [2, 2, 2, 1]), [[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),
    ((3, 0, 1, [2, 3, 3]), [[1, 0, 0], [1, 1, 1], [1, 1, 1]]),  # two blocks do not see each other's later keys
]

# blocks = 2: a block ignores the window (OR(AND(window, causal), block), transformers' PaliGemma); text does
# not; left padding: never a padding key (second case)
WRITTEN_OUT_PAST_WINDOW = [
    ((4, 2, 1, [2, 2, 2, 1]), [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 1]]),  # query 2 sees key 0
    ((5, 2, 1, [0, 2, 2, 2, 1]), [[0, 0, 0, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]),
    ((3, 1, 1, [2, 1, 2]), [[1, 0, 1], [0, 1, 0], [1, 0, 1]]),  # a block is its equal values, not a run
    ((4, 2, 1, [1, 1, 1, 1]), [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),  # no blocks: the window
]


@pytest.mark.parametrize(("case", "expected"), WRITTEN_OUT)
def test_the_rule_on_cases_written_out(case, expected) -> None:
    seq, window, causal, row = case
    for blocks in (0, 1):
        got = visible(np.array([row]), seq, window, causal, blocks)[0]
        np.testing.assert_array_equal(got, np.array(expected, bool))


@pytest.mark.parametrize(("case", "expected"), WRITTEN_OUT_PAST_WINDOW)
def test_blocks_past_the_window_on_cases_written_out(case, expected) -> None:
    seq, window, causal, row = case
    got = visible(np.array([row]), seq, window, causal, BLOCKS_PAST_WINDOW)[0]
    np.testing.assert_array_equal(got, np.array(expected, bool))


def test_the_two_block_modes_differ_only_on_a_block_past_the_window() -> None:
    for (seq, window, causal, row), _ in WRITTEN_OUT:
        mask = np.array([row])
        same = (visible(mask, seq, window, causal, 1) == visible(mask, seq, window, causal, 2)).all()
        assert same == (window == 0 or max(row) < 2), (seq, window, causal, row)


def test_an_unknown_block_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="blocks must be one of"):
        visible(np.ones((1, 3), np.int64), 3, 0, True, 3)


@pytest.mark.parametrize("blocks", BLOCK_MODES)
@pytest.mark.parametrize(("window", "causal"), KINDS)
def test_numpy_and_torch_evaluate_the_rule_alike(window, causal, blocks) -> None:
    for seq, past in grid():
        mask = block_masks(seq + past)
        expected = visible(mask, seq, window, causal, blocks)
        assert expected.shape == (len(mask), seq, seq + past) and expected.dtype == bool
        got = visible(torch.from_numpy(mask), seq, window, bool(causal), blocks)
        np.testing.assert_array_equal(got.numpy(), expected)


# --- the ONNX function body --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=3 * len(KINDS))
def function_mask_session(window: int, causal: int, blocks: int = 0):
    """The op's function body, inlined, with the mask its Softmax input is selected by as the output. `blocks`
    0: the attribute absent (onnx's inliner then leaves it out of the body, as a runtime reads its default)."""
    attrs = {"scale": 1.0, "softcap": 0.0, "window": window, "causal": causal, "kv_num_heads": KV_HEADS}
    attrs.update({"blocks": blocks} if blocks else {})
    names = ["query", "key", "value", "attention_mask"]
    node = helper.make_node("Attention", names, ["output"], domain=attention_op.DOMAIN, **attrs)
    dims = {"query": ["B", HEADS, "S", HEAD_DIM], "key": ["B", KV_HEADS, "T", HEAD_DIM]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims.get(n, dims["key"])) for n in names[:3]]
    inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]))
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, dims["query"])
    model = harness.one_node_model(node, inputs, [output], attention_op.function_protos(OPSET))
    model = onnx.inliner.inline_local_functions(model)
    producers = {out: n for n in model.graph.node for out in n.output}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 1, "the function body changed shape: find its mask anew"
    where = producers[softmax[0].input[0]]
    assert where.op_type == "Where"
    model.graph.output.append(helper.make_tensor_value_info(where.input[0], TensorProto.BOOL, None))
    return harness.session(model), where.input[0]


@pytest.mark.parametrize("blocks", BLOCK_MODES)
@pytest.mark.parametrize(("window", "causal"), KINDS)
def test_function_body_follows_the_rule(window, causal, blocks) -> None:
    """With blocks in the mask whatever the attribute: absent, the body reads them as `blocks` 1 does."""
    session, name = function_mask_session(window, causal, blocks)
    for seq, past in grid():
        mask = block_masks(seq + past)
        batch, total = mask.shape
        feeds = {
            "query": np.zeros((batch, HEADS, seq, HEAD_DIM), np.float32),
            "key": np.zeros((batch, KV_HEADS, total, HEAD_DIM), np.float32),
            "value": np.zeros((batch, KV_HEADS, total, HEAD_DIM), np.float32),
            "attention_mask": mask,
        }
        got = session.run([name], feeds)[0]  # [batch, 1, 1, seq, total]
        np.testing.assert_array_equal(got.reshape(batch, seq, total), visible(mask, seq, window, causal, blocks),
                                      err_msg=f"seq {seq}, past {past}")  # fmt: skip


# --- the ort-cpu lowering ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=3 * len(KINDS))
def lowered_mask_session(window: int, causal: int, blocks: int = 0):
    """ort_cpu's visibility nodes for one (window, causal), from a query and a key mask."""
    query = ir.Value(name="query", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(["B", HEADS, "S", HEAD_DIM]))  # fmt: skip
    mask = ir.Value(name="attention_mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "T"]))
    tape = Tape()
    out = ort_cpu._visibility(tape, query, mask, window, causal, blocks)
    out.name, out.type, out.shape = "visible", ir.TensorType(ir.DataType.BOOL), ir.Shape(["B", 1, "S", "T"])
    graph = ir.Graph([query, mask], [out], nodes=tape.nodes, opset_imports={"": OPSET}, name="visibility")
    proto = ir.to_proto(ir.Model(graph, ir_version=harness.IR_VERSION))
    onnx.checker.check_model(proto, full_check=True)
    return harness.session(proto)


@pytest.mark.parametrize("blocks", BLOCK_MODES)
@pytest.mark.parametrize(("window", "causal"), KINDS)
def test_lowered_mask_follows_the_rule(window, causal, blocks) -> None:
    """Without `blocks` the lowering builds no block term (text graphs stay as they were): masks of 0 and 1."""
    session = lowered_mask_session(window, causal, blocks)
    for seq, past in grid():
        mask = (block_masks if blocks else masks)(seq + past)
        query = np.zeros((len(mask), HEADS, seq, HEAD_DIM), np.float32)
        got = session.run(["visible"], {"query": query, "attention_mask": mask})[0]  # [batch, 1, seq, total]
        expected = visible(mask, seq, window, causal, blocks)
        np.testing.assert_array_equal(got[:, 0], expected, err_msg=f"seq {seq}, past {past}")


# --- the two block modes are transformers' own masks -------------------------------------------------------


def test_the_block_modes_are_transformers_sliding_masks() -> None:
    """transformers' sliding-layer masks, from its own entry points, on a left-padded batch whose blocks are
    longer than the window: PaliGemma's (`create_sliding_window_causal_mask` with `block_sequence_ids`) is
    `blocks` 2, Gemma 3's (`create_masks_for_vision_model`) is `blocks` 1, and each differs from the other mode.
    Compared on the real queries (a padding query's row is unspecified)."""
    import transformers
    from transformers import masking_utils
    from transformers.models.gemma3 import modeling_gemma3

    from gemma_export.models.multimodal import image_blocks

    window = 3
    # row 0: left padding 2, one block of 6 (an image, or PaliGemma's prefix), text; row 1: two blocks
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0]])
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11])
    batch, total = types.shape
    embeds, position_ids = torch.zeros(batch, total, 8), torch.arange(total)[None].expand(batch, total)
    sizes = {"num_hidden_layers": 2, "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "head_dim": 8,
             "num_attention_heads": 1, "num_key_value_heads": 1, "sliding_window": window}  # fmt: skip
    configs = [transformers.Gemma2Config(**sizes), transformers.Gemma3TextConfig(**sizes)]
    for config in configs:
        config._attn_implementation = "sdpa"  # a boolean mask
    paligemma = masking_utils.create_sliding_window_causal_mask(
        configs[0], embeds, padding, None, position_ids, block_sequence_ids=torch.where(types == 1, 0, -1)
    )
    gemma3 = modeling_gemma3.create_masks_for_vision_model(
        configs[1], embeds, padding, None, position_ids, modeling_gemma3.get_block_sequence_ids_for_mask(types)
    )["sliding_attention"]
    real = padding.numpy().astype(bool)  # [batch, total]: the real queries (seq = total)
    # the op's mask: PaliGemma's block id 0 over every marked token is one value; Gemma 3 numbers each image
    pg_mask, g3_mask = (padding * (1 + types)).numpy(), (padding * (1 + image_blocks(types))).numpy()
    for theirs, ours, mode, other in ((paligemma, pg_mask, BLOCKS_PAST_WINDOW, 1), (gemma3, g3_mask, 1, 2)):
        theirs = theirs.numpy()[:, 0]  # [batch, seq, total]
        np.testing.assert_array_equal(visible(ours, total, window, True, mode)[real], theirs[real])
        assert (visible(ours, total, window, True, other)[real] != theirs[real]).any()
