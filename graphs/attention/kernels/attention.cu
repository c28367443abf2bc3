// ai.gemma::Attention on CUDA (graphs/attention.md): soft-capped, sliding-window or global, causal or
// bidirectional grouped-query attention, float32 / float16 / bfloat16 inputs, float32 accumulation.
//
// One kernel serves prefill and decode, flash-attention style (the scores are never written to memory):
//
//   grid.x  tiles of kRowsPerBlock query rows of one key/value head: the G = heads / kv_heads query heads
//           that share it times the q_len queries, flattened as row = i * G + g, so the rows of one block
//           sit at neighbouring positions and share their range of visible keys;
//   grid.y  the key/value head;
//   grid.z  batch row x key split.
//
// A block walks its key range in tiles of 32 keys: the tile's keys and values are staged in shared memory
// as float32 (read from global memory once for all G heads of the group and all rows of the block), then
// each warp takes its rows: lane j computes the score of key j, the warp keeps an online softmax (running
// max m, running sum l, unnormalised output acc with each lane owning head_dim / 32 channels, as float4
// groups) and rescales acc by exp(m_old - m_new) whenever the max grows. Shared memory is read as float4
// (rows padded to a multiple of 4 floats). Keys outside the block's visible range (before the window, after
// the causal diagonal) are never loaded.
//
// Decode (q_len = 1) has only G rows per key/value head, far too few blocks to fill a GPU: the launcher then
// splits the key range over grid.z (split-K/T). Each split writes its unnormalised (acc, m, l) to a float32
// workspace and a second kernel merges the splits: out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s.
//
// Rows with no visible key (the spec leaves their output unspecified but finite) give zeros: such a row's
// l stays 0 and it is written as 0 instead of 0 / 0.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>

#include "gemma_attention.h"
#include "launch.cuh"

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 2;                          // rows a warp carries at once (registers: 2 x acc)
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;     // 16 query rows per block
constexpr int kTileKeys = 32;                            // one key per lane
constexpr int kMaxHeadDim = 256;
constexpr int kMaxSplits = 64;
constexpr int64_t kSplitMaxQueries = 16;                 // only short queries (decode) split the keys
constexpr int64_t kMinKeysPerSplit = 128;

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- element conversions -------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ bool mask_at(const void *mask, int mask_dtype, int64_t index) {
    switch (mask_dtype) {
    case GEMMA_MASK_INT64:
        return static_cast<const int64_t *>(mask)[index] != 0;
    case GEMMA_MASK_INT32:
        return static_cast<const int32_t *>(mask)[index] != 0;
    default:
        return static_cast<const uint8_t *>(mask)[index] != 0;
    }
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// The spec's visibility rule (graphs/attention.md, "Visibility"; gemma_export/ops/visibility.py) without
// the mask: may query slot p see key slot j?
__device__ __forceinline__ bool in_reach(int64_t p, int64_t j, int64_t window, int causal) {
    const int64_t d = p - j;
    if (causal) return d >= 0 && (window <= 0 || d < window);
    return window <= 0 || (d < window && -d < window);
}

struct Params {
    const void *query, *key, *value, *mask;
    void *out;
    float *partial_acc;  // [splits][batch * heads * q_len][head_dim], used when splits > 1
    float *partial_ml;   // [splits][batch * heads * q_len][2]: (m, l)
    int64_t batch, heads, kv_heads, group, q_len, kv_len, head_dim, window;
    float scale, softcap;
    int causal, mask_dtype, splits;
};

// Copy `count` rows of head_dim elements starting at `src` into shared memory as float32, row stride
// `stride` floats, columns head_dim .. padded - 1 zeroed (padded = head_dim rounded up to 4, so that the
// dot products can read float4s; the zeros keep the padding out of them). 16-byte vector loads when the rows
// allow it (the common case: head_dim * size a multiple of 16, aligned tensors; then padded = head_dim).
template <typename T>
__device__ __forceinline__ void stage_rows(float *dst, int stride, const T *src, int count, int head_dim,
                                           int padded, bool vectorized) {
    if (vectorized) {
        constexpr int kPer = 16 / sizeof(T);
        const uint4 *vsrc = reinterpret_cast<const uint4 *>(src);
        for (int e = threadIdx.x; e < count * head_dim / kPer; e += kThreads) {
            uint4 raw = __ldg(vsrc + e);
            const T *vals = reinterpret_cast<const T *>(&raw);
            const int row = (e * kPer) / head_dim, col = (e * kPer) % head_dim;
#pragma unroll
            for (int u = 0; u < kPer; ++u) dst[row * stride + col + u] = to_float(vals[u]);
        }
    } else {
        for (int e = threadIdx.x; e < count * padded; e += kThreads) {
            const int row = e / padded, col = e % padded;
            dst[row * stride + col] = col < head_dim ? to_float(src[row * head_dim + col]) : 0.f;
        }
    }
}

// DC4 = ceil(head_dim / 128): the float4 groups of output channels each lane owns (lane l owns channels
// 4 (l + 32 c) .. 4 (l + 32 c) + 3, c < DC4).
template <typename T, int DC4>
__global__ void __launch_bounds__(kThreads) attention_kernel(Params p) {
    extern __shared__ float4 smem4[];  // float4: 16-byte aligned
    const int D = static_cast<int>(p.head_dim);
    const int Dp = (D + 3) / 4 * 4;  // row length in shared memory, a whole number of float4s
    const int D4 = Dp / 4;
    // Key rows are 4 floats longer than Dp: lane j reads float4 d4 of row j, and the 8 lanes of a quarter-warp
    // (one 128-bit shared-memory access) then fall on distinct banks.
    const int k_stride = Dp + 4;
    float *k_tile = reinterpret_cast<float *>(smem4);  // [kTileKeys][Dp + 4]
    float *v_tile = k_tile + kTileKeys * k_stride;      // [kTileKeys][Dp]
    float *q_rows = v_tile + kTileKeys * Dp;            // [kRowsPerBlock][Dp]
    int *key_ok = reinterpret_cast<int *>(q_rows + kRowsPerBlock * Dp);  // [kTileKeys]: the mask of the tile

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t b = blockIdx.z / p.splits;
    const int split = blockIdx.z % p.splits;
    const int64_t kvh = blockIdx.y;
    const int64_t G = p.group, S = p.q_len, n_keys = p.kv_len;  // (spec: G, S, T)
    const int64_t rows = S * G;
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
    const int64_t offset = n_keys - S;  // query i sits at key slot offset + i

    // Stage this block's query rows (float32, zero-padded) for the lanes' dot products.
    const T *query = static_cast<const T *>(p.query);
    for (int e = threadIdx.x; e < kRowsPerBlock * Dp; e += kThreads) {
        const int64_t r = row0 + e / Dp;
        const int col = e % Dp;
        float v = 0.f;
        if (r < rows && col < D) {
            const int64_t i = r / G, h = kvh * G + r % G;
            v = to_float(query[((b * p.heads + h) * S + i) * D + col]);
        }
        q_rows[e] = v;
    }

    // The keys any row of this block may see, then this split's share of them (whole tiles).
    const int64_t last_row = imin(row0 + kRowsPerBlock, rows) - 1;
    const int64_t p_first = offset + row0 / G, p_last = offset + last_row / G;
    const int64_t lo = p.window > 0 ? imax(0, p_first - p.window + 1) : 0;
    const int64_t hi = p.causal ? p_last + 1 : (p.window > 0 ? imin(n_keys, p_last + p.window) : n_keys);
    const int64_t per_split = ((hi - lo + p.splits - 1) / p.splits + kTileKeys - 1) / kTileKeys * kTileKeys;
    const int64_t k_begin = lo + split * per_split;
    const int64_t k_end = imin(hi, k_begin + per_split);

    // Per row of this warp: position, online-softmax state and the lane's output channels.
    int64_t my_row[kRowsPerWarp], my_pos[kRowsPerWarp];
    float m[kRowsPerWarp], l[kRowsPerWarp];
    float4 acc[kRowsPerWarp][DC4];
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        my_row[k] = row0 + k * kWarps + warp;
        my_pos[k] = offset + my_row[k] / G;
        m[k] = -INFINITY;
        l[k] = 0.f;  // this lane's share of the sum; reduced over the warp at the end
#pragma unroll
        for (int c = 0; c < DC4; ++c) acc[k][c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }

    const size_t elem = sizeof(T);
    const T *key = static_cast<const T *>(p.key) + (b * p.kv_heads + kvh) * n_keys * D;
    const T *value = static_cast<const T *>(p.value) + (b * p.kv_heads + kvh) * n_keys * D;
    const bool vectorized = (D * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(key) % 16 == 0 &&
                            reinterpret_cast<uintptr_t>(value) % 16 == 0;

    for (int64_t j0 = k_begin; j0 < k_end; j0 += kTileKeys) {
        const int n = static_cast<int>(imin(kTileKeys, k_end - j0));
        __syncthreads();  // every warp is done with the previous tile (and q_rows is written, first time)
        stage_rows(k_tile, k_stride, key + j0 * D, n, D, Dp, vectorized);
        stage_rows(v_tile, Dp, value + j0 * D, n, D, Dp, vectorized);
        if (threadIdx.x < kTileKeys) {
            key_ok[threadIdx.x] = threadIdx.x < n && mask_at(p.mask, p.mask_dtype, b * n_keys + j0 + threadIdx.x);
        }
        __syncthreads();

        const int64_t j = j0 + lane;
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
            if (my_row[k] >= rows) continue;  // uniform over the warp
            const int rr = k * kWarps + warp;
            const bool visible = key_ok[lane] && in_reach(my_pos[k], j, p.window, p.causal);

            // Lane j's score: q . k in float32, times scale, soft-capped (before the mask, as the spec says).
            float s = -INFINITY;
            if (visible) {
                const float4 *q = reinterpret_cast<const float4 *>(q_rows + rr * Dp);  // a broadcast read
                const float4 *kr = reinterpret_cast<const float4 *>(k_tile + lane * k_stride);
                float dot = 0.f;
#pragma unroll 4
                for (int d4 = 0; d4 < D4; ++d4) {
                    const float4 a = q[d4], c = kr[d4];
                    dot = fmaf(a.x, c.x, dot);
                    dot = fmaf(a.y, c.y, dot);
                    dot = fmaf(a.z, c.z, dot);
                    dot = fmaf(a.w, c.w, dot);
                }
                s = dot * p.scale;
                if (p.softcap > 0.f) s = p.softcap * tanhf(s / p.softcap);
            }

            // Online softmax: nothing to do when no key of the tile is visible to this row.
            const float tile_max = warp_max(s);
            if (tile_max == -INFINITY) continue;
            const float m_new = fmaxf(m[k], tile_max);
            const float correction = expf(m[k] - m_new);  // 0 on the first visible tile (m = -inf)
            const float prob = visible ? expf(s - m_new) : 0.f;
            l[k] = l[k] * correction + prob;
#pragma unroll
            for (int c = 0; c < DC4; ++c) {
                acc[k][c].x *= correction;
                acc[k][c].y *= correction;
                acc[k][c].z *= correction;
                acc[k][c].w *= correction;
            }
            // acc += sum_j prob_j * v[j]: each lane its float4 groups of channels, prob_j from lane j.
            for (int jj = 0; jj < n; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, prob, jj);
                const float4 *vr = reinterpret_cast<const float4 *>(v_tile + jj * Dp);
#pragma unroll
                for (int c = 0; c < DC4; ++c) {
                    const int d4 = lane + 32 * c;
                    if (d4 < D4) {
                        const float4 v = vr[d4];
                        acc[k][c].x = fmaf(pj, v.x, acc[k][c].x);
                        acc[k][c].y = fmaf(pj, v.y, acc[k][c].y);
                        acc[k][c].z = fmaf(pj, v.z, acc[k][c].z);
                        acc[k][c].w = fmaf(pj, v.w, acc[k][c].w);
                    }
                }
            }
            m[k] = m_new;
        }
    }

    // Write the rows: normalised output, or this split's unnormalised partial result.
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
        if (my_row[k] >= rows) continue;
        const float total = warp_sum(l[k]);
        const int64_t i = my_row[k] / G, h = kvh * G + my_row[k] % G;
        const int64_t out_row = (b * p.heads + h) * S + i;
        const float inv = p.splits == 1 && total > 0.f ? 1.f / total : 1.f;  // no visible key: acc is 0
        T *out = static_cast<T *>(p.out) + out_row * D;
        const int64_t slot = split * p.batch * p.heads * S + out_row;
        float *part = p.splits > 1 ? p.partial_acc + slot * D : nullptr;
#pragma unroll
        for (int c = 0; c < DC4; ++c) {
            const float vals[4] = {acc[k][c].x, acc[k][c].y, acc[k][c].z, acc[k][c].w};
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int d = 4 * (lane + 32 * c) + u;
                if (d >= D) continue;
                if (part) {
                    part[d] = vals[u];
                } else {
                    out[d] = from_float<T>(vals[u] * inv);
                }
            }
        }
        if (part && lane == 0) {
            p.partial_ml[2 * slot] = m[k];
            p.partial_ml[2 * slot + 1] = total;
        }
    }
}

// Merge the splits of each output row (one warp per row): rescale each split's sum and output to the
// global max M and normalise once.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(Params p) {
    const int64_t n_rows = p.batch * p.heads * p.q_len;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    const int D = static_cast<int>(p.head_dim);

    float M = -INFINITY;
    for (int s = 0; s < p.splits; ++s) M = fmaxf(M, p.partial_ml[2 * (s * n_rows + row)]);
    T *out = static_cast<T *>(p.out) + row * D;
    if (M == -INFINITY) {  // no split saw a visible key
        for (int d = lane; d < D; d += 32) out[d] = from_float<T>(0.f);
        return;
    }
    float total = 0.f;
    for (int s = 0; s < p.splits; ++s) {
        const float ms = p.partial_ml[2 * (s * n_rows + row)];
        if (ms != -INFINITY) total += expf(ms - M) * p.partial_ml[2 * (s * n_rows + row) + 1];
    }
    const float inv = 1.f / total;  // > 0: the split holding M has l >= 1
    for (int d = lane; d < D; d += 32) {
        float sum = 0.f;
        for (int s = 0; s < p.splits; ++s) {
            const float ms = p.partial_ml[2 * (s * n_rows + row)];
            if (ms != -INFINITY) sum = fmaf(expf(ms - M), p.partial_acc[(s * n_rows + row) * D + d], sum);
        }
        out[d] = from_float<T>(sum * inv);
    }
}

size_t shared_bytes(int64_t head_dim) {
    const int64_t padded = (head_dim + 3) / 4 * 4;  // as attention_kernel lays it out
    return sizeof(float) * (kTileKeys * (padded + 4) + kTileKeys * padded + kRowsPerBlock * padded) +
           sizeof(int) * kTileKeys;
}

size_t workspace_for(int64_t splits, int64_t batch, int64_t heads, int64_t q_len, int64_t head_dim) {
    return static_cast<size_t>(splits * batch * heads * q_len * (head_dim + 2)) * sizeof(float);
}

// How many key splits: enough blocks for about two waves on this GPU, each split at least
// kMinKeysPerSplit keys; 1 for long queries (prefill has blocks enough).
int choose_splits(const Params &p, int64_t row_tiles) {
    if (p.q_len > kSplitMaxQueries) return 1;
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
        return 1;
    }
    const int64_t blocks = row_tiles * p.kv_heads * p.batch;
    const int64_t span = p.window > 0 ? imin(p.kv_len, p.window + p.q_len) : p.kv_len;
    int64_t splits = imin((2 * sms + blocks - 1) / blocks, (span + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
    splits = imin(splits, 65535 / p.batch);  // grid.z = batch x splits
    return static_cast<int>(imax(1, imin(splits, kMaxSplits)));
}

template <typename T, int DC4>
cudaError_t launch_typed(Params p, int64_t row_tiles, cudaStream_t stream) {
    const size_t smem = shared_bytes(p.head_dim);
    auto kernel = attention_kernel<T, DC4>;
    if (smem > 48 * 1024) {  // above the default: opt in (up to 99 KB on sm_86/89, more on sm_80/90)
        cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
        if (err != cudaSuccess) return err;
    }
    dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.kv_heads),
              static_cast<unsigned>(p.batch * p.splits));
    GEMMA_LAUNCH(kernel, grid, kThreads, smem, stream, p);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t n_rows = p.batch * p.heads * p.q_len;
    GEMMA_LAUNCH(combine_kernel<T>, static_cast<unsigned>((n_rows + kWarps - 1) / kWarps), kThreads, 0, stream, p);
    return cudaGetLastError();
}

template <typename T> cudaError_t launch_dc(const Params &p, int64_t row_tiles, cudaStream_t stream) {
    if (p.head_dim <= 128) return launch_typed<T, 1>(p, row_tiles, stream);
    return launch_typed<T, 2>(p, row_tiles, stream);
}

}  // namespace

extern "C" GEMMA_API size_t gemma_attention_workspace_size(int64_t batch, int64_t heads, int64_t q_len,
                                                           int64_t head_dim) {
    if (q_len > kSplitMaxQueries || batch <= 0 || heads <= 0 || q_len <= 0 || head_dim <= 0) return 0;
    return workspace_for(kMaxSplits, batch, heads, q_len, head_dim);
}

extern "C" GEMMA_API int gemma_attention_launch(const void *query, const void *key, const void *value,
                                                const void *mask, void *out, int64_t batch, int64_t heads,
                                                int64_t kv_heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                                                float scale, float softcap, int64_t window, int causal, int dtype,
                                                int mask_dtype, void *workspace, size_t workspace_bytes,
                                                void *stream) {
    // The spec's shape rules (graphs/attention.md, "Shape rules and errors"), before anything is enqueued.
    if (batch < 0 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || q_len < 1 || q_len > kv_len) {
        return GEMMA_ERR_SHAPE;
    }
    if (head_dim < 1 || head_dim > kMaxHeadDim) return GEMMA_ERR_HEAD_DIM;
    if (dtype < GEMMA_DTYPE_FLOAT32 || dtype > GEMMA_DTYPE_BFLOAT16 || mask_dtype < GEMMA_MASK_INT64 ||
        mask_dtype > GEMMA_MASK_BOOL) {
        return GEMMA_ERR_DTYPE;
    }
    if (batch == 0) return GEMMA_OK;
    if (!query || !key || !value || !mask || !out) return GEMMA_ERR_POINTER;
    // Grid limits: row tiles on x (2^31 - 1), key/value heads on y and batch x splits on z (65535 each).
    if ((q_len * (heads / kv_heads) + kRowsPerBlock - 1) / kRowsPerBlock > 0x7fffffff || kv_heads > 65535 ||
        batch > 65535) {
        return GEMMA_ERR_SHAPE;
    }

    Params p{};
    p.query = query;
    p.key = key;
    p.value = value;
    p.mask = mask;
    p.out = out;
    p.batch = batch;
    p.heads = heads;
    p.kv_heads = kv_heads;
    p.group = heads / kv_heads;
    p.q_len = q_len;
    p.kv_len = kv_len;
    p.head_dim = head_dim;
    p.window = window > 0 ? window : 0;  // a negative window reads as 0 (global), as the other faces do
    p.scale = scale;
    p.softcap = softcap > 0.f ? softcap : 0.f;
    p.causal = causal ? 1 : 0;
    p.mask_dtype = mask_dtype;
    p.splits = 1;

    cudaStream_t s = static_cast<cudaStream_t>(stream);
    const int64_t row_tiles = (q_len * p.group + kRowsPerBlock - 1) / kRowsPerBlock;
    int splits = choose_splits(p, row_tiles);
    void *scratch = nullptr;  // allocated here when the caller's workspace is too small
    if (splits > 1) {
        const size_t need = workspace_for(splits, batch, heads, q_len, head_dim);
        void *base = workspace;
        if (base == nullptr || workspace_bytes < need) {
            if (cudaMallocAsync(&scratch, need, s) != cudaSuccess) {
                cudaGetLastError();  // clear it; run unsplit instead
                scratch = nullptr;
                splits = 1;
            }
            base = scratch;
        }
        if (splits > 1) {
            p.splits = splits;
            p.partial_acc = static_cast<float *>(base);
            p.partial_ml = p.partial_acc + static_cast<size_t>(splits * batch * heads * q_len * head_dim);
        }
    }

    cudaError_t err;
    switch (dtype) {
    case GEMMA_DTYPE_FLOAT32:
        err = launch_dc<float>(p, row_tiles, s);
        break;
    case GEMMA_DTYPE_FLOAT16:
        err = launch_dc<__half>(p, row_tiles, s);
        break;
    default:
        err = launch_dc<__nv_bfloat16>(p, row_tiles, s);
        break;
    }
    if (scratch != nullptr) {
        cudaError_t freed = cudaFreeAsync(scratch, s);
        if (err == cudaSuccess) err = freed;
    }
    return static_cast<int>(err);
}
