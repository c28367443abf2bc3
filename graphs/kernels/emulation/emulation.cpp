// The CUDA runtime API functions libgemma_kernels.so's launchers call, emulated on the CPU (emulation.h).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

extern "C" {

// 132 "SMs", an H100's count, so that the launchers choose the key splits they would choose there.
static const int kMultiprocessors = 132;

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }
cudaError_t cudaGetDevice(int *device) {
    *device = 0;
    return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int) {
    *value = attr == cudaDevAttrMultiProcessorCount ? kMultiprocessors : 0;
    return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void *, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMallocAsync(void **pointer, size_t size, cudaStream_t) {
    *pointer = std::malloc(size ? size : 1);
    return *pointer ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeAsync(void *pointer, cudaStream_t) {
    std::free(pointer);
    return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
    std::memmove(dst, src, count);
    return cudaSuccess;
}
}
