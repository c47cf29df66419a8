// Device helpers shared by the .cu files: dtype conversion, dtype dispatch, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common.h"

namespace spectral_kernels {

// --- conversions (all arithmetic is fp32) ---------------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Element (r, c) of a strided matrix, as float. Offsets in int64.
template <typename T>
__device__ __forceinline__ float load_at(const T* ptr, int64_t r, int64_t c, int64_t s0, int64_t s1) {
  return to_float(ptr[r * s0 + c * s1]);
}

// Row a of an adapter bank [n, ...] for index value a, or -1 when a lies outside 0..n-1: the caller
// then uses a NaN coefficient (bank_nan) and never reads outside the bank.
__device__ __forceinline__ int64_t bank_row(int64_t a, int64_t n) { return (a >= 0 && a < n) ? a : -1; }
__device__ __forceinline__ float bank_nan() { return __int_as_float(0x7fc00000); }

// 16 bytes = kVec<T> consecutive elements, as floats. ptr must be 16-byte aligned.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void load16(const T* ptr, float (&out)[kVec<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int q = 0; q < kVec<T>; ++q) out[q] = to_float(e[q]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// --- dispatch -----------------------------------------------------------------------------------------
// SK_DISPATCH_DTYPE(dtype, scalar_t, ...): runs the body with scalar_t = float / __half / __nv_bfloat16.
#define SK_DISPATCH_DTYPE(DTYPE, NAME, ...)                                         \
  [&] {                                                                             \
    switch (DTYPE) {                                                                \
      case ::spectral_kernels::DType::kFloat32: {                                   \
        using NAME = float;                                                         \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case ::spectral_kernels::DType::kFloat16: {                                   \
        using NAME = __half;                                                        \
        return __VA_ARGS__();                                                       \
      }                                                                             \
      case ::spectral_kernels::DType::kBFloat16: {                                  \
        using NAME = __nv_bfloat16;                                                 \
        return __VA_ARGS__();                                                       \
      }                                                                             \
    }                                                                               \
    throw std::invalid_argument("dtype: unsupported dtype code " +                  \
                                std::to_string(static_cast<int>(DTYPE)));           \
  }()

// --- errors -------------------------------------------------------------------------------------------
inline std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// SPECTRAL_KERNELS_CUDA_SYNC=1 synchronises the stream after every launch so that a fault inside a
// kernel is reported by the call that launched it (debugging; off by default).
inline bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("SPECTRAL_KERNELS_CUDA_SYNC");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}

// Throw (RuntimeError in Python) naming the kernel and the CUDA error if the launch failed.
inline void check_launch(const char* kernel, cudaStream_t stream) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess && sync_after_launch()) {
    // A stream being captured into a CUDA graph must not be synchronised (the capture would fail).
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    err = cudaStreamIsCapturing(stream, &capture);
    if (err == cudaSuccess && capture == cudaStreamCaptureStatusNone) err = cudaStreamSynchronize(stream);
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + ": CUDA error " + cuda_error_text(err));
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace spectral_kernels
