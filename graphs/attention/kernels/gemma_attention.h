/* C ABI of the ai.gemma::Attention CUDA kernels (graphs/attention.md is the spec).
 *
 * Layouts, all dense row-major, as the op's inputs:
 *   query  [batch, heads, q_len, head_dim]      dtype
 *   key    [batch, kv_heads, kv_len, head_dim]  dtype   (past first, then the q_len new positions)
 *   value  [batch, kv_heads, kv_len, head_dim]  dtype
 *   mask   [batch, kv_len]                      mask_dtype, != 0 = a real token
 *   out    [batch, heads, q_len, head_dim]      dtype
 * Query i sits at key slot p = kv_len - q_len + i. Scores are accumulated in float32, soft-capped, masked
 * (causal / sliding window / padding), softmaxed in float32; rows with no visible key give zeros.
 */
#ifndef GEMMA_ATTENTION_H
#define GEMMA_ATTENTION_H

#include "gemma_kernels_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bytes of scratch the launcher may use for a split-key (decode) launch of these sizes; 0 when it never
 * splits (q_len above the split limit). Pass at least this much as `workspace` to keep the launch free of
 * allocations (TensorRT's getWorkspaceSize); with less, the launcher allocates stream-ordered scratch itself
 * (cudaMallocAsync) when it splits. */
GEMMA_API size_t gemma_attention_workspace_size(int64_t batch, int64_t heads, int64_t q_len, int64_t head_dim);

/* Enqueue the attention on `stream` (a cudaStream_t; NULL = the legacy default stream).
 * scale, softcap (0 = none), window (0 = global), causal (1 = causal, 0 = bidirectional) are the op's
 * attributes; dtype is a GEMMA_DTYPE_*, mask_dtype a GEMMA_MASK_*. Returns GEMMA_OK or an error code. */
GEMMA_API int gemma_attention_launch(const void *query, const void *key, const void *value, const void *mask,
                                     void *out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t q_len,
                                     int64_t kv_len, int64_t head_dim, float scale, float softcap, int64_t window,
                                     int causal, int dtype, int mask_dtype, void *workspace,
                                     size_t workspace_bytes, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* GEMMA_ATTENTION_H */
