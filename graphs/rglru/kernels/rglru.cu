// ai.gemma::RGLRU on CUDA (graphs/rglru.md): h_t = a_t h_{t-1} + sqrt(1 - a_t^2) x_t with document resets,
// float32 state, float32 / float16 / bfloat16 activations.
//
// One thread per (batch row, channel) walks the sequence in order, keeping h in a register: the recurrence
// is sequential in time and independent across channels, and the work per element is a handful of flops, so
// the kernel is bound by reading x and log_a and writing y once. Neighbouring threads hold neighbouring
// channels, so every load and store of a time step is coalesced; the loop is unrolled so that several
// steps' loads (which do not depend on h) are in flight at once. The same launch is the decode step
// (seq = 1): one load of x and log_a, one store of y and h_last per channel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "gemma_rglru.h"
#include "launch.cuh"

namespace {

// Small blocks: with few rows (decode, batch 1) the batch x width threads are few, and small blocks spread
// them over more multiprocessors, each adding its own loads in flight.
constexpr int kThreads = 64;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rglru_scan_kernel(const T *__restrict__ x, const T *__restrict__ log_a, const uint8_t *__restrict__ reset,
                      const float *h0, T *__restrict__ y, float *h_last, int64_t batch, int64_t seq,
                      int64_t width) {
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // b * width + c
    if (idx >= batch * width) return;
    const int64_t b = idx / width, c = idx % width;
    const int64_t base = b * seq * width + c;  // x[b, 0, c]
    const uint8_t *starts = reset + b * seq;

    float h = h0[idx];
#pragma unroll 8
    for (int64_t t = 0; t < seq; ++t) {
        const float xt = to_float(x[base + t * width]);
        const float la = to_float(log_a[base + t * width]);
        if (starts[t]) {
            // A document starts: the state is dropped (selected away, not multiplied by 0) and x enters
            // unnormalised.
            h = xt;
        } else {
            // sqrt(1 - a^2) as sqrt(-expm1(2 log a)): accurate as a -> 1, where 1 - a * a cancels
            // (graphs/rglru.md, "a -> 1 loses precision"). log_a = -inf gives a = 0 and a multiplier of 1.
            const float a = expf(la);
            h = fmaf(a, h, xt * sqrtf(-expm1f(2.f * la)));
        }
        y[base + t * width] = from_float<T>(h);
    }
    h_last[idx] = h;  // float32, not rounded to T
}

template <typename T>
cudaError_t launch_typed(const void *x, const void *log_a, const void *reset, const float *h0, void *y,
                         float *h_last, int64_t batch, int64_t seq, int64_t width, cudaStream_t stream) {
    const int64_t n = batch * width;
    GEMMA_LAUNCH(rglru_scan_kernel<T>, static_cast<unsigned>((n + kThreads - 1) / kThreads), kThreads, 0, stream,
                 static_cast<const T *>(x), static_cast<const T *>(log_a), static_cast<const uint8_t *>(reset), h0,
                 static_cast<T *>(y), h_last, batch, seq, width);
    return cudaGetLastError();
}

}  // namespace

extern "C" GEMMA_API int gemma_rglru_launch(const void *x, const void *log_a, const void *reset, const float *h0,
                                            void *y, float *h_last, int64_t batch, int64_t seq, int64_t width,
                                            int dtype, void *stream) {
    if (batch < 0 || seq < 0 || width < 0) return GEMMA_ERR_SHAPE;
    if (dtype < GEMMA_DTYPE_FLOAT32 || dtype > GEMMA_DTYPE_BFLOAT16) return GEMMA_ERR_DTYPE;
    const int64_t n = batch * width;
    if (n == 0) return GEMMA_OK;  // empty outputs
    if ((n + kThreads - 1) / kThreads > 0x7fffffff) return GEMMA_ERR_SHAPE;
    if (!h0 || !h_last) return GEMMA_ERR_POINTER;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    if (seq == 0) {  // the spec's empty sequence: y is empty, h_last = h0
        if (h_last == h0) return GEMMA_OK;
        return static_cast<int>(cudaMemcpyAsync(h_last, h0, n * sizeof(float), cudaMemcpyDeviceToDevice, s));
    }
    if (!x || !log_a || !reset || !y) return GEMMA_ERR_POINTER;
    cudaError_t err;
    switch (dtype) {
    case GEMMA_DTYPE_FLOAT32:
        err = launch_typed<float>(x, log_a, reset, h0, y, h_last, batch, seq, width, s);
        break;
    case GEMMA_DTYPE_FLOAT16:
        err = launch_typed<__half>(x, log_a, reset, h0, y, h_last, batch, seq, width, s);
        break;
    default:
        err = launch_typed<__nv_bfloat16>(x, log_a, reset, h0, y, h_last, batch, seq, width, s);
        break;
    }
    return static_cast<int>(err);
}
