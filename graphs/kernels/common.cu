// The parts of libgemma_kernels.so's C ABI that every op shares (gemma_kernels_common.h).
#include <cuda_runtime.h>

#include "gemma_kernels_common.h"

extern "C" GEMMA_API int gemma_kernels_abi_version(void) { return GEMMA_KERNELS_ABI_VERSION; }

extern "C" GEMMA_API const char *gemma_kernels_error_string(int code) {
    switch (code) {
    case GEMMA_OK:
        return "ok";
    case GEMMA_ERR_SHAPE:
        return "sizes violate the op's shape rules";
    case GEMMA_ERR_DTYPE:
        return "unknown dtype or mask dtype code";
    case GEMMA_ERR_HEAD_DIM:
        return "head_dim must be between 1 and 256";
    case GEMMA_ERR_POINTER:
        return "a required pointer is NULL";
    default:
        return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error code";
    }
}
