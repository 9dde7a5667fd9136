// What the CUDA part of the build holds. Built from cuda_info.cu only when CUDA is compiled.
#pragma once

namespace gem {

// CUDART_VERSION the CUDA sources were compiled against (e.g. 13000).
int cuda_build_version();

// Compute capabilities the fatbinary holds, comma-separated ("80,90").
const char* cuda_architectures();

}  // namespace gem
