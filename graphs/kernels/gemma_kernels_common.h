/* Shared by the C ABIs of libgemma_kernels.so (graphs/attention/kernels, graphs/rglru/kernels).
 *
 * Plain C: a TensorRT plugin, a ctypes loader (gemma_export/ops/cuda.py) or a C++ service can call it without
 * our build flags. Every launcher is asynchronous on the given stream and returns GEMMA_OK or an error code
 * (negative: a bad argument, checked before anything is launched; positive: a cudaError_t).
 */
#ifndef GEMMA_KERNELS_COMMON_H
#define GEMMA_KERNELS_COMMON_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define GEMMA_API __declspec(dllexport)
#else
#define GEMMA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or the meaning of an argument changes. */
#define GEMMA_KERNELS_ABI_VERSION 1

/* Element types of activations (query/key/value/output, x/log_a/y). */
enum {
    GEMMA_DTYPE_FLOAT32 = 0,
    GEMMA_DTYPE_FLOAT16 = 1,
    GEMMA_DTYPE_BFLOAT16 = 2,
};

/* Element types of the attention mask (only != 0 matters). */
enum {
    GEMMA_MASK_INT64 = 0,
    GEMMA_MASK_INT32 = 1,
    GEMMA_MASK_BOOL = 2, /* one byte per element */
};

enum {
    GEMMA_OK = 0,
    GEMMA_ERR_SHAPE = -1,    /* sizes violate the op's shape rules */
    GEMMA_ERR_DTYPE = -2,    /* unknown dtype or mask dtype code */
    GEMMA_ERR_HEAD_DIM = -3, /* head_dim outside 1..256 */
    GEMMA_ERR_POINTER = -4,  /* a required pointer is NULL */
};

GEMMA_API int gemma_kernels_abi_version(void);

/* A static string describing a launcher's return code (cudaGetErrorString for positive codes). */
GEMMA_API const char *gemma_kernels_error_string(int code);

#ifdef __cplusplus
}
#endif

#endif /* GEMMA_KERNELS_COMMON_H */
