// Backward kernels of spectral_linear. The products g = dy·U and dx = dy·weight + (g ⊙ d)·Vᵀ run on
// the forward's fused GEMM (launch_lowrank_gemm, spectral_linear_fwd.cu) with swapped strides; this
// file holds the reductions over tokens, fused into one launch:
//
//   dd[j]    = Σ_t z[t, j]·g[t, j]     fp32 accumulate, fp32 out
//   dbias[n] = Σ_t dy[t, n]            fp32 accumulate, op dtype out
//
// and, for an adapter bank, the per-adapter reduction over tokens sorted by adapter:
//
//   dd[a, j] = Σ_{t: idx_t = a} z[t, j]·g[t, j]     fp32 accumulate, fp32 out
#include <climits>

#include "cuda_utils.cuh"
#include "spectral_linear.h"

namespace spectral_kernels {
namespace {

// 32 columns per block, 16 row lanes: lane x of every row lane reads column x, so each row of
// 32 columns is one coalesced read; the 16 partial sums are added in a fixed order.
constexpr int kRedCols = 32;
constexpr int kRedRows = 16;
constexpr int kRedThreads = kRedCols * kRedRows;

template <typename scalar_t>
__global__ void __launch_bounds__(kRedThreads) coeff_and_bias_grads_kernel(const CoeffBiasGradParams p,
                                                                           int64_t dd_tiles) {
  __shared__ float red[kRedRows][kRedCols + 1];
  const int tx = threadIdx.x % kRedCols, ty = threadIdx.x / kRedCols;
  const bool is_dd = blockIdx.x < dd_tiles;
  const int64_t tile = is_dd ? blockIdx.x : blockIdx.x - dd_tiles;
  const int64_t col = tile * kRedCols + tx;
  const int64_t ncols = is_dd ? p.k : p.out;

  float acc = 0.f;
  if (col < ncols) {
    if (is_dd) {
      const scalar_t* z = static_cast<const scalar_t*>(p.z.ptr);
      const scalar_t* g = static_cast<const scalar_t*>(p.g.ptr);
      for (int64_t t = ty; t < p.T; t += kRedRows) {
        acc += load_at(z, t, col, p.z.s0, p.z.s1) * load_at(g, t, col, p.g.s0, p.g.s1);
      }
    } else {
      const scalar_t* dy = static_cast<const scalar_t*>(p.dy.ptr);
      for (int64_t t = ty; t < p.T; t += kRedRows) acc += load_at(dy, t, col, p.dy.s0, p.dy.s1);
    }
  }
  red[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < ncols) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kRedRows; ++r) sum += red[r][tx];
    if (is_dd) p.dd[col] = sum;
    else static_cast<scalar_t*>(p.dbias)[col] = from_float<scalar_t>(sum);
  }
}

// Block (a, c) owns adapter a's 32-column tile c: its 16 row lanes walk the adapter's tokens
// order[starts[a] + ty], order[starts[a] + ty + 16], ... and the 16 partial sums are added in a
// fixed order, as in the kernel above; an adapter with no token writes zeros. Every sum depends on
// the sorted order alone, which a stable sort makes a function of idx: bitwise reproducible.
template <typename scalar_t>
__global__ void __launch_bounds__(kRedThreads) bank_coeff_grads_kernel(const BankCoeffGradParams p,
                                                                       int64_t col_tiles) {
  __shared__ float red[kRedRows][kRedCols + 1];
  const int tx = threadIdx.x % kRedCols, ty = threadIdx.x / kRedCols;
  const int64_t a = blockIdx.x / col_tiles, tile = blockIdx.x % col_tiles;
  const int64_t col = tile * kRedCols + tx;
  // Clamped to 0..T so that malformed starts never index outside order.
  const int64_t lo = min(max(p.starts[a], int64_t{0}), p.T);
  const int64_t hi = min(max(p.starts[a + 1], lo), p.T);
  const scalar_t* z = static_cast<const scalar_t*>(p.z.ptr);
  const scalar_t* g = static_cast<const scalar_t*>(p.g.ptr);
  float acc = 0.f;
  if (col < p.k) {
    for (int64_t i = lo + ty; i < hi; i += kRedRows) {
      const int64_t t = p.order[i];
      if (t >= 0 && t < p.T) acc += load_at(z, t, col, p.z.s0, p.z.s1) * load_at(g, t, col, p.g.s0, p.g.s1);
    }
  }
  red[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && col < p.k) {
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kRedRows; ++r) sum += red[r][tx];
    p.dd[a * p.k + col] = sum;
  }
}

}  // namespace

void launch_coeff_and_bias_grads(const CoeffBiasGradParams& p, void* stream_handle) {
  CHECK_POSITIVE(p.T);
  CHECK_POSITIVE(p.k);
  SK_CHECK_ARG(p.z.ptr != nullptr, "z", "null device pointer");
  SK_CHECK_ARG(p.g.ptr != nullptr, "g", "null device pointer");
  SK_CHECK_ARG(p.dd != nullptr, "dd", "null device pointer");
  const bool with_bias = p.dy.ptr != nullptr;
  if (with_bias) {
    CHECK_POSITIVE(p.out);
    SK_CHECK_ARG(p.dbias != nullptr, "dbias", "null device pointer with dy given");
  }
  const int64_t dd_tiles = ceil_div(p.k, kRedCols);
  const int64_t blocks = dd_tiles + (with_bias ? ceil_div(p.out, kRedCols) : 0);
  SK_CHECK_ARG(blocks <= INT_MAX, "out", "too many columns for one launch");
  auto stream = static_cast<cudaStream_t>(stream_handle);
  SK_DISPATCH_DTYPE(p.dtype, scalar_t, [&] {
    coeff_and_bias_grads_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kRedThreads, 0, stream>>>(p, dd_tiles);
  });
  check_launch("coeff_and_bias_grads", stream);
}

void launch_bank_coeff_grads(const BankCoeffGradParams& p, void* stream_handle) {
  CHECK_POSITIVE(p.T);
  CHECK_POSITIVE(p.k);
  SK_CHECK_ARG(p.n > 0, "adapter_index", "needs a bank of n > 0 rows, got n = " + std::to_string(p.n));
  SK_CHECK_ARG(p.z.ptr != nullptr, "z", "null device pointer");
  SK_CHECK_ARG(p.g.ptr != nullptr, "g", "null device pointer");
  SK_CHECK_ARG(p.order != nullptr, "order", "null device pointer");
  SK_CHECK_ARG(p.starts != nullptr, "starts", "null device pointer");
  SK_CHECK_ARG(p.dd != nullptr, "dd", "null device pointer");
  const int64_t col_tiles = ceil_div(p.k, kRedCols);
  SK_CHECK_ARG(p.n <= INT_MAX / col_tiles, "adapter_index", "too many adapters for one launch");
  const int64_t blocks = p.n * col_tiles;
  auto stream = static_cast<cudaStream_t>(stream_handle);
  SK_DISPATCH_DTYPE(p.dtype, scalar_t, [&] {
    bank_coeff_grads_kernel<scalar_t>
        <<<static_cast<unsigned>(blocks), kRedThreads, 0, stream>>>(p, col_tiles);
  });
  check_launch("bank_coeff_grads", stream);
}

}  // namespace spectral_kernels
