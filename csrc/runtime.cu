// Queries about the build and the CUDA runtime. None of them throws: `spectral-kernels info` and
// the backend status call them on machines with no GPU or no driver.
#include "cuda_utils.cuh"
#include "spectral_linear.h"

#ifndef SPECTRAL_KERNELS_ARCHS
#define SPECTRAL_KERNELS_ARCHS "unknown"
#endif

namespace spectral_kernels {

const char* compiled_archs() { return SPECTRAL_KERNELS_ARCHS; }

int cuda_runtime_version() { return CUDART_VERSION; }

int device_count(std::string* error) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // a missing driver or device is not an error for later calls to report
    if (error != nullptr) *error = cuda_error_text(err);
    return 0;
  }
  return n;
}

}  // namespace spectral_kernels
