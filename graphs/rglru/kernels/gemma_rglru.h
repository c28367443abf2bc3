/* C ABI of the ai.gemma::RGLRU CUDA kernel (graphs/rglru.md is the spec).
 *
 * Layouts, dense row-major, as the op's inputs and outputs:
 *   x       [batch, seq, width]  dtype          the gated input
 *   log_a   [batch, seq, width]  dtype          log of the recurrence weight, <= 0 (-inf allowed)
 *   reset   [batch, seq]         bool (1 byte)  true where a document starts
 *   h0      [batch, width]       float32        the state before step 0
 *   y       [batch, seq, width]  dtype          the state after each step, rounded to dtype
 *   h_last  [batch, width]       float32        the state after the last step (h0 when seq = 0)
 * The recurrence runs in float32 whatever dtype is. Prefill (seq > 1) and the decode step (seq = 1) are the
 * same launch. h_last may alias h0 (an in-place state update): each thread reads its h0 before writing.
 */
#ifndef GEMMA_RGLRU_H
#define GEMMA_RGLRU_H

#include "gemma_kernels_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Enqueue the recurrence on `stream` (a cudaStream_t; NULL = the legacy default stream). dtype is a
 * GEMMA_DTYPE_*. Returns GEMMA_OK or an error code. */
GEMMA_API int gemma_rglru_launch(const void *x, const void *log_a, const void *reset, const float *h0, void *y,
                                 float *h_last, int64_t batch, int64_t seq, int64_t width, int dtype, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* GEMMA_RGLRU_H */
