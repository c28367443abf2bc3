// CPU emulation of the few CUDA features libgemma_kernels.so uses, so that CI machines without a GPU run the
// kernels' own code (index arithmetic, tiling, key ranges, splits, online softmax, the launchers' choices) on
// the conformance vectors. Not a CUDA implementation: it runs one block at a time, each block's threads as OS
// threads (__syncthreads: a barrier of the block; __shfl*_sync: an exchange through a barrier of the warp),
// with host memory as device memory and the host's libm. It cannot find races, memory-model or
// performance problems; the GPU check (make gpu-check) does what it cannot.
//
// Used by tests/support/kernel_emulation.py: g++ -include emulation.h on each .cu, plus emulation.cpp (the
// runtime API functions the launchers call).
#ifndef GEMMA_KERNELS_EMULATION_H
#define GEMMA_KERNELS_EMULATION_H

#include <cuda_runtime.h>  // types and declarations only (host-compilable); nothing links to libcudart

#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define __launch_bounds__(...)

namespace gemma_emulation {

constexpr int kShuffleSlots = 32;

struct Warp {
    std::barrier<> sync{32};
    double exchange[kShuffleSlots];  // one value per lane (our kernels shuffle floats)
};

inline thread_local uint3 thread_index, block_index;
inline thread_local Warp *warp;
inline thread_local std::barrier<> *block;

// Run `kernel(args...)` over the grid: blocks one after another (so that one static shared-memory buffer per
// translation unit serves every block), the block's threads concurrently.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block_dim, size_t /*shared_bytes*/, cudaStream_t, Args... args) {
    const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                std::barrier<> block_sync(threads);
                std::unique_ptr<Warp[]> warps(new Warp[(threads + 31) / 32]);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (int t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        thread_index = {static_cast<unsigned>(t), 0, 0};
                        block_index = {x, y, z};
                        warp = &warps[t / 32];
                        block = &block_sync;
                        kernel(args...);
                        // A finished thread leaves both barriers (kernels that return early never sync after).
                        block->arrive_and_drop();
                        warp->sync.arrive_and_drop();
                    });
                }
                for (auto &thread : pool) thread.join();
            }
}

template <typename T> T shuffle(T value, int source) {
    const int lane = static_cast<int>(thread_index.x % 32);
    warp->exchange[lane] = static_cast<double>(value);
    warp->sync.arrive_and_wait();
    const T result = static_cast<T>(warp->exchange[source & 31]);
    warp->sync.arrive_and_wait();
    return result;
}

}  // namespace gemma_emulation

#define threadIdx (::gemma_emulation::thread_index)
#define blockIdx (::gemma_emulation::block_index)
#define GEMMA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
    ::gemma_emulation::launch(kernel, dim3(grid), dim3(block), (shared_bytes), (stream), __VA_ARGS__)

inline void __syncthreads() { ::gemma_emulation::block->arrive_and_wait(); }
template <typename T> T __shfl_sync(unsigned, T value, int source) {
    return ::gemma_emulation::shuffle(value, source);
}
template <typename T> T __shfl_xor_sync(unsigned, T value, int mask) {
    return ::gemma_emulation::shuffle(value, static_cast<int>(::gemma_emulation::thread_index.x % 32) ^ mask);
}
template <typename T> T __ldg(const T *pointer) { return *pointer; }
// cuda_runtime.h declares this overload for nvcc only.
template <typename Kernel> cudaError_t cudaFuncSetAttribute(Kernel *entry, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void *>(entry), attr, value);
}

// `extern __shared__ float4 smem4[]` in a kernel of an unnamed namespace names this buffer (blocks run one at a
// time). 256 KiB: more than any GPU gives a block.
namespace {
float4 smem4[16384];
}

#endif  // GEMMA_KERNELS_EMULATION_H
