// Shared by every translation unit: dtype codes, argument checks, error reporting.
// Host-only C++ (no CUDA headers) so that bindings.cpp compiles with the plain C++ compiler.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace spectral_kernels {

// The dtype code that crosses the Python boundary (spectral_kernels/ops/spectral_linear_cuda.py
// holds the same table).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline DType dtype_from_code(int code) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(code) +
                                " (0 = float32, 1 = float16, 2 = bfloat16)");
  }
  return static_cast<DType>(code);
}

}  // namespace spectral_kernels

// Argument checks. Each throws std::invalid_argument (ValueError in Python) naming the argument.
#define SK_CHECK_ARG(cond, name, what)                                              \
  do {                                                                              \
    if (!(cond)) throw std::invalid_argument(std::string(name) + ": " + (what));    \
  } while (0)

#define CHECK_PTR(p) SK_CHECK_ARG((p) != 0, #p, "null device pointer")
#define CHECK_POSITIVE(v) \
  SK_CHECK_ARG((v) > 0, #v, "must be positive, got " + std::to_string(v))
#define CHECK_STRIDE(s) \
  SK_CHECK_ARG((s) >= 0, #s, "strides must be non-negative, got " + std::to_string(s))
#define CHECK_LE(v, limit)                                                          \
  SK_CHECK_ARG((v) <= (limit), #v,                                                  \
               "must be at most " + std::to_string(limit) + ", got " + std::to_string(v))
