// Private to the .cu files of libgemma_kernels.so: how a kernel is launched. Written as a macro so that the
// CPU emulation CI uses (graphs/kernels/emulation/) can run the same launcher code: it defines GEMMA_LAUNCH
// itself before this header is read.
#ifndef GEMMA_KERNELS_LAUNCH_CUH
#define GEMMA_KERNELS_LAUNCH_CUH

#ifndef GEMMA_LAUNCH
#define GEMMA_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
    kernel<<<(grid), (block), (shared_bytes), (stream)>>>(__VA_ARGS__)
#endif

#endif  // GEMMA_KERNELS_LAUNCH_CUH
