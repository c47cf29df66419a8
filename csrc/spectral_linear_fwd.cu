// Forward kernels of spectral_linear:
//
//   decode plan (T <= 16)   y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias and z = x·V in one launch;
//   mma plan (larger T)     out = a1·b1 + (a2 ⊙ scale)·b2 + bias, a tile GEMM on tensor cores
//                           (WMMA, fp32 accumulate) for fp16/bf16 and fp32 FMA for fp32. The
//                           backward reuses it (spectral_linear_bwd.cu).
#include <mma.h>

#include <climits>

#include "cuda_utils.cuh"
#include "gemm_tiles.cuh"
#include "spectral_linear.h"

namespace spectral_kernels {
namespace {

// ===================================================================================================
// Decode plan
// ===================================================================================================
// One launch, two roles, chosen per block by a ticket taken from an atomic counter:
//
//  * z blocks (the first tickets): block (s, c) computes the partial product of x[:, split s] and
//    V[split s, column tile c] (32 columns), writes it to the fp32 workspace, and the last split of
//    tile c to finish sums the splits in a fixed order into z (output) and z ⊙ d (workspace);
//  * y blocks (the other tickets): 16 output rows each (2 per warp); they stream their rows of
//    weight once, then wait until every z tile is finished, then stream their rows of U.
//
// Tickets, not blockIdx, decide the role: a block holding a y ticket is running, so every z ticket
// was taken by a block that is running or done, and z blocks never wait: the wait cannot deadlock
// whatever order the hardware schedules blocks in. Each weight byte is read once; x (T×in, tiny)
// is staged through shared memory by every block and served by L2.
constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kDecodeWarps * kRowsPerWarp;
constexpr int kZCols = 32;

// Columns of x staged per step; MAXT·CHUNK fp32 values = 8 / 32 / 32 KiB of shared memory for
// MAXT = 1 / 4 / 16. A multiple of 32·kVec for every dtype (the swizzle below needs it).
__host__ __device__ constexpr int decode_chunk(int max_t) { return max_t >= 16 ? 512 : 2048; }

struct DecodeGrid {
  int64_t splits, col_tiles, z_blocks, y_blocks;
};

DecodeGrid decode_grid(int64_t T, int64_t in, int64_t out, int64_t k) {
  const int max_t = T <= 1 ? 1 : (T <= 4 ? 4 : 16);
  DecodeGrid g;
  g.splits = ceil_div(in, decode_chunk(max_t));
  g.col_tiles = ceil_div(k, kZCols);
  g.z_blocks = g.splits * g.col_tiles;
  g.y_blocks = ceil_div(out, kRowsPerBlock);
  return g;
}

// xs[t][c] = x[t, c0 + c], 0 for t >= T or past `in`. SWIZZLE stores column
// c = b·(32·VEC) + lane·VEC + q at b·(32·VEC) + q·32 + lane, so that when lane l of a warp holds the
// VEC weights of columns l·VEC .. l·VEC+VEC-1, its reads of element q hit 32 distinct banks.
template <typename scalar_t, int MAXT, int CHUNK, bool SWIZZLE>
__device__ __forceinline__ void stage_x(float* xs, const DecodeFwdParams& p, int64_t c0) {
  const scalar_t* x = static_cast<const scalar_t*>(p.x.ptr);
  constexpr int V = kVec<scalar_t>;
  constexpr int G = 32 * V;
  for (int idx = threadIdx.x; idx < MAXT * CHUNK; idx += kDecodeThreads) {
    const int t = idx / CHUNK, pos = idx % CHUNK;
    int c = pos;
    if (SWIZZLE) {
      const int b = pos / G, r = pos % G;
      c = b * G + (r % 32) * V + r / 32;
    }
    const int64_t col = c0 + c;
    xs[idx] = (t < p.T && col < p.in) ? load_at(x, t, col, p.x.s0, p.x.s1) : 0.f;
  }
}

template <typename scalar_t, int MAXT>
__device__ void decode_z_block(const DecodeFwdParams& p, float* xs, int64_t zb, int64_t splits,
                               int64_t col_tiles) {
  constexpr int CHUNK = decode_chunk(MAXT);
  const scalar_t* V = static_cast<const scalar_t*>(p.V.ptr);
  const int64_t s = zb / col_tiles, c = zb % col_tiles;
  const int64_t i0 = s * CHUNK;
  const int64_t lim = min(static_cast<int64_t>(CHUNK), p.in - i0);
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t j = c * kZCols + tx;
  float* partial = p.workspace;                    // [splits][T][k]
  float* zd = p.workspace + splits * p.T * p.k;    // [T][k]

  stage_x<scalar_t, MAXT, CHUNK, false>(xs, p, i0);
  __syncthreads();
  float acc[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.f;
  if (j < p.k) {
    for (int64_t ii = ty; ii < lim; ii += kDecodeWarps) {
      const float v = load_at(V, i0 + ii, j, p.V.s0, p.V.s1);
#pragma unroll
      for (int t = 0; t < MAXT; ++t) acc[t] += xs[t * CHUNK + ii] * v;
    }
  }
  __syncthreads();  // xs is reused as the cross-warp reduction buffer red[warp][t][lane]
  float* red = xs;  // 8·MAXT·32 <= MAXT·CHUNK floats
#pragma unroll
  for (int t = 0; t < MAXT; ++t) red[(ty * MAXT + t) * 32 + tx] = acc[t];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MAXT * 32; idx += kDecodeThreads) {
    const int t = idx / 32, lane = idx % 32;
    const int64_t jj = c * kZCols + lane;
    if (t < p.T && jj < p.k) {
      float sum = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) sum += red[(w * MAXT + t) * 32 + lane];
      partial[(s * p.T + t) * p.k + jj] = sum;
    }
  }

  // Last split of this column tile to arrive finishes it (threadFenceReduction pattern).
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&p.counters[2 + c], 1) == static_cast<int>(splits - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const scalar_t* d = static_cast<const scalar_t*>(p.d);
  scalar_t* z = static_cast<scalar_t*>(p.z);
  for (int idx = threadIdx.x; idx < MAXT * 32; idx += kDecodeThreads) {
    const int t = idx / 32, lane = idx % 32;
    const int64_t jj = c * kZCols + lane;
    if (t < p.T && jj < p.k) {
      float sum = 0.f;
      for (int64_t s2 = 0; s2 < splits; ++s2) sum += __ldcg(partial + (s2 * p.T + t) * p.k + jj);
      zd[t * p.k + jj] = sum * to_float(d[jj * p.d_s]);
      z[t * p.z_s0 + jj * p.z_s1] = from_float<scalar_t>(sum);
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&p.counters[1], 1);
}

template <typename scalar_t, int MAXT>
__device__ void decode_y_block(const DecodeFwdParams& p, float* xs, int64_t yb, int64_t splits,
                               int64_t col_tiles, bool vec_ok) {
  constexpr int CHUNK = decode_chunk(MAXT);
  constexpr int V = kVec<scalar_t>;
  constexpr int G = 32 * V;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = yb * kRowsPerBlock + warp * kRowsPerWarp;  // this warp's first row

  float acc[kRowsPerWarp][MAXT];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int t = 0; t < MAXT; ++t) acc[r][t] = 0.f;

  // Dense part: x·weightᵀ, each weight row read once, 16 bytes per lane when aligned.
  if (p.weight.ptr != nullptr) {
    const scalar_t* W = static_cast<const scalar_t*>(p.weight.ptr);
    for (int64_t c0 = 0; c0 < p.in; c0 += CHUNK) {
      __syncthreads();  // previous chunk fully consumed
      if (vec_ok) stage_x<scalar_t, MAXT, CHUNK, true>(xs, p, c0);
      else stage_x<scalar_t, MAXT, CHUNK, false>(xs, p, c0);
      __syncthreads();
      const int64_t lim = min(static_cast<int64_t>(CHUNK), p.in - c0);
      if (vec_ok) {
        // vec_ok: weight.s1 == 1, weight.s0 % V == 0, 16-byte aligned base; c0 and base are
        // multiples of V, so every full vector load below is aligned.
        for (int base = lane * V; base < lim; base += G) {
          float w[kRowsPerWarp][V];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const int64_t n = n0 + r;
            const scalar_t* src = W + n * p.weight.s0 + c0 + base;
            if (n < p.out && base + V <= lim) {
              load16(src, w[r]);
            } else {
#pragma unroll
              for (int q = 0; q < V; ++q) w[r][q] = (n < p.out && base + q < lim) ? to_float(src[q]) : 0.f;
            }
          }
          const float* xrow = xs + (base - lane * V) + lane;  // swizzled block of this vector
#pragma unroll
          for (int q = 0; q < V; ++q)
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
              const float xv = xrow[t * CHUNK + q * 32];
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] += w[r][q] * xv;
            }
        }
      } else {
        for (int c = lane; c < lim; c += 32) {
          float w[kRowsPerWarp];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const int64_t n = n0 + r;
            w[r] = n < p.out ? load_at(W, n, c0 + c, p.weight.s0, p.weight.s1) : 0.f;
          }
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            const float xv = xs[t * CHUNK + c];
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] += w[r] * xv;
          }
        }
      }
    }
  }

  // Wait until every z tile is finished (z blocks hold lower tickets, see above).
  if (threadIdx.x == 0) {
    const volatile int* ready = p.counters + 1;
    while (*ready < static_cast<int>(col_tiles)) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();

  // Low-rank part: (z ⊙ d)·Uᵀ, z ⊙ d read from L2 (written by other blocks in this launch).
  const scalar_t* U = static_cast<const scalar_t*>(p.U.ptr);
  const float* zd = p.workspace + splits * p.T * p.k;
  for (int64_t j0 = 0; j0 < p.k; j0 += CHUNK) {
    __syncthreads();
    const int64_t lim = min(static_cast<int64_t>(CHUNK), p.k - j0);
    for (int idx = threadIdx.x; idx < MAXT * CHUNK; idx += kDecodeThreads) {
      const int t = idx / CHUNK, c = idx % CHUNK;
      xs[idx] = (t < p.T && c < lim) ? __ldcg(zd + t * p.k + j0 + c) : 0.f;
    }
    __syncthreads();
    for (int c = lane; c < lim; c += 32) {
      float u[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t n = n0 + r;
        u[r] = n < p.out ? load_at(U, n, j0 + c, p.U.s0, p.U.s1) : 0.f;
      }
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        const float zv = xs[t * CHUNK + c];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][t] += u[r] * zv;
      }
    }
  }

  // Sum the lanes; lane t writes token t (butterfly: every lane holds every sum).
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.y);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t n = n0 + r;
    const float b = (bias != nullptr && n < p.out) ? to_float(bias[n * p.bias_s]) : 0.f;
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      const float v = warp_sum(acc[r][t]);
      if (lane == t && t < p.T && n < p.out) y[t * p.y_s0 + n * p.y_s1] = from_float<scalar_t>(v + b);
    }
  }
}

template <typename scalar_t, int MAXT>
__global__ void __launch_bounds__(kDecodeThreads)
spectral_linear_decode_fwd_kernel(const DecodeFwdParams p, int64_t splits, int64_t col_tiles,
                                  bool vec_ok) {
  __shared__ float xs[MAXT * decode_chunk(MAXT)];
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(&p.counters[0], 1);
  __syncthreads();
  const int64_t z_blocks = splits * col_tiles;
  if (ticket < z_blocks) {
    decode_z_block<scalar_t, MAXT>(p, xs, ticket, splits, col_tiles);
  } else {
    decode_y_block<scalar_t, MAXT>(p, xs, ticket - z_blocks, splits, col_tiles, vec_ok);
  }
}

template <typename scalar_t, int MAXT>
void launch_decode(const DecodeFwdParams& p, cudaStream_t stream) {
  const DecodeGrid g = decode_grid(p.T, p.in, p.out, p.k);
  const int64_t blocks = g.z_blocks + g.y_blocks;
  SK_CHECK_ARG(blocks <= INT_MAX, "out", "too many rows for one launch");
  const bool vec_ok = p.weight.ptr != nullptr && p.weight.s1 == 1 &&
                      p.weight.s0 % kVec<scalar_t> == 0 &&
                      reinterpret_cast<uintptr_t>(p.weight.ptr) % 16 == 0;
  spectral_linear_decode_fwd_kernel<scalar_t, MAXT>
      <<<static_cast<unsigned>(blocks), kDecodeThreads, 0, stream>>>(p, g.splits, g.col_tiles, vec_ok);
  check_launch("spectral_linear_decode_fwd", stream);
}

// ===================================================================================================
// mma plan: out[M, N] = a1·b1 + (a2 ⊙ scale)·b2 + bias
// ===================================================================================================
// 64×64 output tile per block; the two products walk K in turn into the same fp32 accumulators,
// so y is written once (the fused low-rank plan of DESIGN.md §3). Single-buffered: a tile is loaded
// to shared memory, then consumed; no cp.async pipeline yet.
constexpr int kBM = 64, kBN = 64;

// --- fp16 / bf16: WMMA 16×16×16 fragments, 4 warps as 2×2, 32×32 per warp ---------------------------
constexpr int kMmaBK = 32;
constexpr int kMmaThreads = 128;
constexpr int kLdA = kMmaBK + 8;  // pitches: multiples of 8 halves (WMMA), rows 16 B aligned,
constexpr int kLdB = kBN + 8;     // padding against bank conflicts
constexpr int kLdC = kBN + 4;

template <typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads) lowrank_gemm_mma_kernel(const LowRankGemmParams p) {
  using namespace nvcuda;
  __shared__ __align__(32) scalar_t As[kBM * kLdA];
  __shared__ __align__(32) scalar_t Bs[kMmaBK * kLdB];
  __shared__ __align__(32) float Cs[kBM * kLdC];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int seg = 0; seg < 2; ++seg) {
    const MatrixArg& a = seg == 0 ? p.a1 : p.a2;
    const MatrixArg& b = seg == 0 ? p.b1 : p.b2;
    const int64_t K = seg == 0 ? p.K1 : p.K2;
    if (a.ptr == nullptr || K == 0) continue;
    const scalar_t* A = static_cast<const scalar_t*>(a.ptr);
    const scalar_t* B = static_cast<const scalar_t*>(b.ptr);
    const scalar_t* scale = seg == 1 ? static_cast<const scalar_t*>(p.scale) : nullptr;
    for (int64_t k0 = 0; k0 < K; k0 += kMmaBK) {
      load_tile<scalar_t, scalar_t, kBM, kMmaBK, kLdA, false>(As, A, a.s0, a.s1, m0, k0, p.M, K,
                                                              scale, p.scale_s);
      load_tile<scalar_t, scalar_t, kMmaBK, kBN, kLdB, false>(Bs, B, b.s0, b.s1, k0, n0, K, p.N,
                                                              nullptr, 0);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kMmaBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> af[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::row_major> bf[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], As + (wm * 32 + i * 16) * kLdA + kk, kLdA);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(bf[j], Bs + kk * kLdB + wn * 32 + j * 16, kLdB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
      }
      __syncthreads();
    }
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* out = static_cast<scalar_t*>(p.out);
  for (int idx = threadIdx.x; idx < kBM * kBN; idx += kMmaThreads) {
    const int r = idx / kBN, c = idx % kBN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < p.M && n < p.N) {
      float v = Cs[r * kLdC + c];
      if (bias != nullptr) v += to_float(bias[n * p.bias_s]);
      out[m * p.out_s0 + n * p.out_s1] = from_float<scalar_t>(v);
    }
  }
}

// --- fp32: IEEE FMA (like PyTorch's default fp32 matmul, no TF32), 4×4 outputs per thread ----------
constexpr int kFmaBK = 16;
constexpr int kFmaThreads = 256;
constexpr int kLdF = kBM + 4;

__global__ void __launch_bounds__(kFmaThreads) lowrank_gemm_fma_kernel(const LowRankGemmParams p) {
  __shared__ float As[kFmaBK * kLdF];  // transposed: As[k][m]
  __shared__ float Bs[kFmaBK * kLdF];  // Bs[k][n]
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};

  for (int seg = 0; seg < 2; ++seg) {
    const MatrixArg& a = seg == 0 ? p.a1 : p.a2;
    const MatrixArg& b = seg == 0 ? p.b1 : p.b2;
    const int64_t K = seg == 0 ? p.K1 : p.K2;
    if (a.ptr == nullptr || K == 0) continue;
    const float* A = static_cast<const float*>(a.ptr);
    const float* B = static_cast<const float*>(b.ptr);
    const float* scale = seg == 1 ? static_cast<const float*>(p.scale) : nullptr;
    for (int64_t k0 = 0; k0 < K; k0 += kFmaBK) {
      load_tile<float, float, kBM, kFmaBK, kLdF, true>(As, A, a.s0, a.s1, m0, k0, p.M, K, scale, p.scale_s);
      load_tile<float, float, kFmaBK, kBN, kLdF, false>(Bs, B, b.s0, b.s1, k0, n0, K, p.N, nullptr, 0);
      __syncthreads();
      // Two-level sum: each kFmaBK-long chain starts from zero and is then added to acc (one
      // chain over all of K gave 2-3× cuBLAS's float32 error on an H100).
      float part[4][4] = {};
#pragma unroll
      for (int kk = 0; kk < kFmaBK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[kk * kLdF + ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk * kLdF + tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) part[i][j] = fmaf(av[i], bv[j], part[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
      __syncthreads();
    }
  }

  const float* bias = static_cast<const float*>(p.bias);
  float* out = static_cast<float*>(p.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (m < p.M && n < p.N) {
        out[m * p.out_s0 + n * p.out_s1] = acc[i][j] + (bias != nullptr ? bias[n * p.bias_s] : 0.f);
      }
    }
  }
}

}  // namespace

// ===================================================================================================
// Launchers
// ===================================================================================================
void decode_workspace_sizes(int64_t T, int64_t in, int64_t k, int64_t* n_float, int64_t* n_int) {
  const DecodeGrid g = decode_grid(T, in, /*out=*/1, k);
  *n_float = (g.splits + 1) * T * k;  // partial sums [splits][T][k], then z ⊙ d [T][k]
  *n_int = 2 + g.col_tiles;           // ticket, finished tiles, splits done per tile
}

void launch_spectral_linear_decode_fwd(const DecodeFwdParams& p, void* stream_handle) {
  CHECK_POSITIVE(p.T);
  CHECK_LE(p.T, kDecodeMaxTokens);
  CHECK_POSITIVE(p.in);
  CHECK_POSITIVE(p.out);
  CHECK_POSITIVE(p.k);
  SK_CHECK_ARG(p.x.ptr != nullptr, "x", "null device pointer");
  SK_CHECK_ARG(p.U.ptr != nullptr, "U", "null device pointer");
  SK_CHECK_ARG(p.V.ptr != nullptr, "V", "null device pointer");
  SK_CHECK_ARG(p.d != nullptr, "d", "null device pointer");
  SK_CHECK_ARG(p.y != nullptr, "y", "null device pointer");
  SK_CHECK_ARG(p.z != nullptr, "z", "null device pointer");
  SK_CHECK_ARG(p.workspace != nullptr, "workspace", "null device pointer");
  SK_CHECK_ARG(p.counters != nullptr, "counters", "null device pointer");
  auto stream = static_cast<cudaStream_t>(stream_handle);
  SK_DISPATCH_DTYPE(p.dtype, scalar_t, [&] {
    if (p.T <= 1) launch_decode<scalar_t, 1>(p, stream);
    else if (p.T <= 4) launch_decode<scalar_t, 4>(p, stream);
    else launch_decode<scalar_t, 16>(p, stream);
  });
}

void launch_lowrank_gemm(const LowRankGemmParams& p, void* stream_handle) {
  CHECK_POSITIVE(p.M);
  CHECK_POSITIVE(p.N);
  SK_CHECK_ARG(p.K1 >= 0 && p.K2 >= 0, "K", "must be non-negative");
  SK_CHECK_ARG(p.out != nullptr, "out", "null device pointer");
  SK_CHECK_ARG(p.a1.ptr == nullptr || p.b1.ptr != nullptr, "b1", "null device pointer with a1 given");
  SK_CHECK_ARG(p.a2.ptr == nullptr || p.b2.ptr != nullptr, "b2", "null device pointer with a2 given");
  const int64_t m_tiles = ceil_div(p.M, kBM), n_tiles = ceil_div(p.N, kBN);
  SK_CHECK_ARG(m_tiles <= INT_MAX, "M", "too many rows for one launch");
  SK_CHECK_ARG(n_tiles <= 65535, "N", "too many columns for one launch");
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  auto stream = static_cast<cudaStream_t>(stream_handle);
  switch (p.dtype) {
    case DType::kFloat32:
      lowrank_gemm_fma_kernel<<<grid, kFmaThreads, 0, stream>>>(p);
      check_launch("lowrank_gemm_fma", stream);
      return;
    case DType::kFloat16:
      lowrank_gemm_mma_kernel<__half><<<grid, kMmaThreads, 0, stream>>>(p);
      check_launch("lowrank_gemm_mma[float16]", stream);
      return;
    case DType::kBFloat16:
      lowrank_gemm_mma_kernel<__nv_bfloat16><<<grid, kMmaThreads, 0, stream>>>(p);
      check_launch("lowrank_gemm_mma[bfloat16]", stream);
      return;
  }
  throw std::invalid_argument("dtype: unsupported dtype code " + std::to_string(static_cast<int>(p.dtype)));
}

}  // namespace spectral_kernels
