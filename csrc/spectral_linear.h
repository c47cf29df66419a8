// Params structs and launchers of spectral_linear's kernels. Host-only declarations: no CUDA types.
//
//   forward:  y  = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias,   z = x·V
//   backward: g  = dy·U,  dx = dy·weight + (g ⊙ d)·Vᵀ,   dd = Σ_T z ⊙ g,   dbias = Σ_T dy
//
// Shapes: x [T, in], U [out, k], d [k], V [in, k], bias [out], weight [out, in].
// Every matrix is given by a pointer and two element strides (any layout); offsets are int64.
// Pointers are device addresses; the launchers only check them for null.
//
// Adapter banks: d may be a bank [n, k] with an int64 index idx [T]; token t then reads the row
// d[idx_t] wherever d is applied (the decode plan's z ⊙ d, the GEMM's a2 ⊙ scale), and the bank's
// gradient is dd[a] = Σ_{t: idx_t = a} z_t ⊙ g_t (launch_bank_coeff_grads). An index outside
// 0..n-1 (the Python front end refuses those in eager mode, not under torch.compile) reads a NaN
// coefficient instead of memory outside the bank, and its token adds to no row of dd.
#pragma once

#include <cstdint>

#include "common.h"

namespace spectral_kernels {

// A strided matrix view: element (r, c) lives at ptr + r*s0 + c*s1 (elements of the op's dtype).
struct MatrixArg {
  const void* ptr = nullptr;
  int64_t s0 = 0;
  int64_t s1 = 0;
};

// --- decode plan (forward, T <= kDecodeMaxTokens) -------------------------------------------------
constexpr int kDecodeMaxTokens = 16;

struct DecodeFwdParams {
  MatrixArg x;        // [T, in]
  MatrixArg U;        // [out, k]
  MatrixArg V;        // [in, k]
  MatrixArg weight;   // [out, in]; ptr null in the pure form
  const void* d = nullptr;     // [k], stride d_s; or with idx a bank [n, k], strides d_s0, d_s
  const void* bias = nullptr;  // [out], stride bias_s; null for no bias
  int64_t d_s = 1, bias_s = 1;
  // Adapter bank: null for one d [k]; else idx [T] (stride idx_s) picks token t's row of d [n, k].
  const int64_t* idx = nullptr;
  int64_t idx_s = 1, d_s0 = 0, n = 0;
  void* y = nullptr;  // [T, out], strides y_s0, y_s1
  void* z = nullptr;  // [T, k],   strides z_s0, z_s1
  int64_t y_s0 = 0, y_s1 = 0, z_s0 = 0, z_s1 = 0;
  // Workspace, see decode_workspace_sizes(): workspace_floats fp32 values (partial sums of z and the
  // finished z ⊙ d) and counter_ints int32 counters. The counters must be zero at launch, and the
  // kernel leaves them zero when it ends (its last block resets them), so a workspace can serve
  // launch after launch on one stream without being cleared. The launcher refuses a workspace
  // smaller than the launch needs.
  float* workspace = nullptr;
  int* counters = nullptr;
  int64_t workspace_floats = 0, counter_ints = 0;
  int64_t T = 0, in = 0, out = 0, k = 0;
  DType dtype = DType::kFloat32;
};

// How a decode launch is laid out; a function of the shape and of the device's multiprocessor
// count alone, so that the workspace sizes and the launch agree (decode_plan() computes both).
struct DecodePlan {
  int64_t split_rows = 0;      // rows of V (columns of x) per z block, a multiple of 32
  int64_t splits = 0;          // z blocks per 32-column tile of z: ceil(in / split_rows)
  int64_t col_tiles = 0;       // 32-column tiles of z: ceil(k / 32)
  int64_t z_blocks = 0;        // splits · col_tiles
  int64_t rows_per_block = 0;  // output rows per y block
  int64_t y_blocks = 0;        // ceil(out / rows_per_block)
  int64_t blocks = 0;          // z_blocks + y_blocks
  int64_t n_float = 0;         // fp32 workspace: (splits + 1) · T · k
  int64_t n_int = 0;           // int32 counters: 3 + col_tiles
};

DecodePlan decode_plan(int64_t T, int64_t in, int64_t out, int64_t k, int sm_count);
// Multiprocessor count of a device, read once per device and cached. Throws std::runtime_error
// naming `what` and the CUDA error when it cannot be read (no device, no driver).
int decode_sm_count(int device, const char* what);
// Sizes (in elements) of the fp32 workspace and of the int32 counters (zero at launch) of a decode
// launch on `device`.
void decode_workspace_sizes(int64_t T, int64_t in, int64_t k, int device, int64_t* n_float,
                            int64_t* n_int);
void launch_spectral_linear_decode_fwd(const DecodeFwdParams& p, void* stream);

// --- fused low-rank GEMM (mma plan; both directions) -----------------------------------------------
//   out[M, N] = a1[M, K1]·b1[K1, N] + (a2[M, K2] ⊙ scale[K2])·b2[K2, N] + bias[N]
// forward:  y  = x·weightᵀ + (z ⊙ d)·Uᵀ + bias      (a1 = x, b1 = weightᵀ, a2 = z, b2 = Uᵀ)
//           z  = x·V                                 (a2 absent)
// backward: g  = dy·U;   dx = dy·weight + (g ⊙ d)·Vᵀ
// Either product may be absent (a null pointer); scale and bias may be null.
// With scale_index (adapter banks), scale is a bank [scale_rows, K2] and row m of a2 is scaled by
// scale[scale_index[m]]: forward a2 = z, backward a2 = g, whose rows are tokens.
struct LowRankGemmParams {
  MatrixArg a1, b1, a2, b2;
  const void* scale = nullptr;
  const void* bias = nullptr;
  int64_t scale_s = 1, bias_s = 1;
  const int64_t* scale_index = nullptr;  // [M], stride scale_index_s; null: one scale [K2]
  int64_t scale_index_s = 1, scale_s0 = 0, scale_rows = 0;
  void* out = nullptr;
  int64_t out_s0 = 0, out_s1 = 0;
  int64_t M = 0, N = 0, K1 = 0, K2 = 0;
  DType dtype = DType::kFloat32;
};

void launch_lowrank_gemm(const LowRankGemmParams& p, void* stream);

// --- backward reductions -------------------------------------------------------------------------
//   dd[j] = Σ_t z[t, j]·g[t, j]   (fp32 out)      dbias[n] = Σ_t dy[t, n]   (op dtype out)
// Fixed summation order: the result is bitwise reproducible run to run.
struct CoeffBiasGradParams {
  MatrixArg z;   // [T, k]
  MatrixArg g;   // [T, k]
  MatrixArg dy;  // [T, out]; ptr null: no dbias
  float* dd = nullptr;   // [k], contiguous
  void* dbias = nullptr; // [out], contiguous
  int64_t T = 0, k = 0, out = 0;
  DType dtype = DType::kFloat32;
};

void launch_coeff_and_bias_grads(const CoeffBiasGradParams& p, void* stream);

//   dd[a, j] = Σ_{t: idx_t = a} z[t, j]·g[t, j]   (fp32 out, [n, k]; 0 for an adapter no token has)
// The tokens come sorted by adapter: order [T] is a stable sort of the tokens by idx, and adapter
// a's tokens are order[starts[a] .. starts[a + 1]) (starts [n + 1]). One block per (adapter,
// 32-column tile) sums its tokens in a fixed order: bitwise reproducible run to run, no atomics.
struct BankCoeffGradParams {
  MatrixArg z;   // [T, k]
  MatrixArg g;   // [T, k]
  const int64_t* order = nullptr;   // [T], contiguous
  const int64_t* starts = nullptr;  // [n + 1], contiguous, non-decreasing
  float* dd = nullptr;              // [n, k], contiguous
  int64_t T = 0, k = 0, n = 0;
  DType dtype = DType::kFloat32;
};

void launch_bank_coeff_grads(const BankCoeffGradParams& p, void* stream);

// --- runtime queries (never throw) -----------------------------------------------------------------
const char* compiled_archs();
int cuda_runtime_version();
// Number of visible devices; 0 with the CUDA error in *error when there are none (or no driver).
int device_count(std::string* error);

}  // namespace spectral_kernels
