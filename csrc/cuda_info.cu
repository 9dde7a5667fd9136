// The CUDA translation unit: no kernel is needed yet, but compiling one proves the toolchain
// works end to end, and the bindings report what it was built with.
#include <cuda_runtime.h>

#include "cuda_info.h"

#ifndef GEM_KERNELS_CUDA_ARCHITECTURES
#define GEM_KERNELS_CUDA_ARCHITECTURES "unknown"
#endif

namespace gem {

__global__ void fill_kernel(float* out, float value, long long n) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

int cuda_build_version() { return CUDART_VERSION; }

const char* cuda_architectures() { return GEM_KERNELS_CUDA_ARCHITECTURES; }

}  // namespace gem
