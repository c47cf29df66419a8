// Forward kernels of spectral_linear:
//
//   decode plan (T <= 16)   y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias and z = x·V in one launch;
//   mma plan (larger T)     out = a1·b1 + (a2 ⊙ scale)·b2 + bias, a tile GEMM on tensor cores
//                           (WMMA, fp32 accumulate) for fp16/bf16 and fp32 FMA for fp32. The
//                           backward reuses it (spectral_linear_bwd.cu).
//
// Adapter banks (d [n, k], an index per token): both plans gather token t's row d[idx_t] where
// they apply d, the decode plan when it forms z ⊙ d, the mma plan when it loads a tile of a2 ⊙
// scale; nothing else changes, and without an index the code path is the one-d path.
#include <mma.h>

#include <atomic>
#include <climits>
#include <type_traits>

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
//  * z blocks (the first plan.z_blocks tickets): block (s, c) computes the partial product of
//    x[:, split s] and V[split s, column tile c] (32 columns) and writes it to the fp32 workspace;
//    the last split of tile c to finish sums the splits in a fixed order into z (output) and z ⊙ d
//    (workspace). Splits are sized so that there are at least as many z blocks as multiprocessors
//    where `in` allows it (decode_plan below): z is on the path of every y block, so it is spread
//    over the whole device;
//  * y blocks (the other tickets): decode_rows_per_block(MAXT) output rows each, ROWS per warp;
//    they stream their rows of weight once, then wait until every z tile is finished, then stream
//    their rows of U.
//
// Tickets, not blockIdx, decide the role: a block holding a y ticket is running, so every z ticket
// was taken by a block that is running or done, and z blocks never wait: the wait cannot deadlock
// whatever order the hardware schedules blocks in. Each weight byte is read once; x (T×in, tiny)
// is staged through shared memory by every block and served by L2. Every sum runs in a fixed order
// that depends on the shape and the device's multiprocessor count alone, so results are bitwise
// repeatable run to run on a device.
//
// Counters (int32, zero at launch): [0] tickets taken, [1] z tiles finished, [2] blocks done,
// [3 + c] splits done of tile c. Each block's last access to them is its increment of [2]; the
// block whose increment returns plan.blocks - 1 is therefore the last to touch them in this launch,
// and it zeroes them all: the next launch on the same stream, ordered after this one, finds them
// zero, and the caller never clears them (spectral_kernels/ops/spectral_linear_cuda.py caches the
// workspace per stream).
constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kZCols = 32;                                    // columns of a z tile: one per lane
constexpr int kZRowsPerStep = 4;                              // V rows in flight per warp, z blocks
constexpr int kZSplitGranule = kDecodeWarps * kZRowsPerStep;  // plan.split_rows is a multiple
constexpr int kCounterTickets = 0, kCounterTilesDone = 1, kCounterBlocksDone = 2,
              kCounterSplitsDone = 3;  // + c
constexpr int kDecodeFixedCounters = 3;
constexpr unsigned kWeightVec16 = 1u, kUVec16 = 2u;  // 16-byte row loads of weight / of U

// Tokens are padded up to MAXT = 1, 4 or 16 (one kernel instantiation each).
__host__ __device__ constexpr int decode_max_t(int64_t T) { return T <= 1 ? 1 : (T <= 4 ? 4 : 16); }
// Columns staged per step; MAXT·CHUNK fp32 values = 8 / 32 / 32 KiB of shared memory for
// MAXT = 1 / 4 / 16.
__host__ __device__ constexpr int decode_chunk(int max_t) { return max_t >= 16 ? 512 : 2048; }
// Output rows per warp in y blocks: ROWS independent 16-byte loads in flight per lane per step while
// streaming weight and U. Registers: acc[ROWS][MAXT] + w[ROWS][kVec] fp32, so fewer rows at MAXT 16.
__host__ __device__ constexpr int decode_rows_per_warp(int max_t) { return max_t >= 16 ? 2 : 4; }
__host__ __device__ constexpr int decode_rows_per_block(int max_t) {
  return kDecodeWarps * decode_rows_per_warp(max_t);
}

constexpr bool decode_max_t_covers_every_t() {
  for (int t = 1; t <= kDecodeMaxTokens; ++t)
    if (decode_max_t(t) < t || decode_max_t(t) > 32) return false;
  return true;
}
static_assert(kDecodeThreads % 32 == 0, "whole warps");
static_assert(kDecodeMaxTokens <= 32, "lane t writes token t after the butterfly");
static_assert(decode_max_t_covers_every_t(), "every T <= kDecodeMaxTokens has an instantiation");
static_assert(kZCols == 32, "a z tile has one column per lane");

// What each instantiation relies on.
template <int MAXT>
struct DecodeConfig {
  static constexpr int kChunk = decode_chunk(MAXT);
  static constexpr int kRows = decode_rows_per_warp(MAXT);
  static_assert(MAXT >= 1 && MAXT <= 32, "lane t writes token t after the butterfly: MAXT <= 32");
  static_assert(kChunk % (32 * kVec<float>) == 0 && kChunk % (32 * kVec<__half>) == 0 &&
                    kChunk % (32 * kVec<__nv_bfloat16>) == 0,
                "chunks are whole swizzle blocks of 32·kVec columns for every dtype; chunk starts "
                "are then multiples of kVec, so 16-byte row loads stay aligned");
  static_assert(kDecodeWarps * MAXT * 32 <= MAXT * kChunk,
                "z blocks reuse xs as the reduction buffer red[warp][t][lane]");
  static_assert(kChunk % kZSplitGranule == 0, "plan.split_rows <= chunk, both granule multiples");
  static_assert(decode_rows_per_block(MAXT) == kDecodeWarps * kRows,
                "rows per block = warps · rows per warp");
};

// Stages a chunk of a [T, lim] operand into xs[t·CHUNK + pos], 0 for t >= T or c >= lim.
// SWIZZLE stores column c = b·(32·VEC) + lane·VEC + q at b·(32·VEC) + q·32 + lane, so that when
// lane l of a warp holds the VEC elements of columns l·VEC .. l·VEC+VEC-1 of a row, its reads of
// element q hit 32 distinct banks. load(t, c) gives the value of column c of token t.
template <int MAXT, int CHUNK, bool SWIZZLE, int VEC, typename Load>
__device__ __forceinline__ void stage_chunk(float* xs, int64_t T, int lim, const Load& load) {
  constexpr int G = 32 * VEC;
  for (int idx = threadIdx.x; idx < MAXT * CHUNK; idx += kDecodeThreads) {
    const int t = idx / CHUNK, pos = idx % CHUNK;
    int c = pos;
    if (SWIZZLE) {
      const int b = pos / G, r = pos % G;
      c = b * G + (r % 32) * VEC + r / 32;
    }
    xs[idx] = (t < T && c < lim) ? load(t, c) : 0.f;
  }
}

// acc[r][t] += Σ_{c < lim} M[n0 + r, c0 + c] · xs[t][c] for the ROWS rows n0 .. n0+ROWS-1 of one
// warp (rows >= n_rows read as 0). VEC16: each lane loads 16 bytes (kVec elements) of every row
// per step, ROWS independent loads in flight; needs M.s1 == 1, M.s0 % kVec == 0, a 16-byte
// aligned base and c0 % kVec == 0 (chunk starts are), and xs staged with SWIZZLE. Otherwise one
// element per lane per row (any strides), xs staged plain. A row tail shorter than a vector falls
// back to element loads.
template <typename scalar_t, int MAXT, int CHUNK, int ROWS, bool VEC16>
__device__ __forceinline__ void accumulate_rows(float (&acc)[ROWS][MAXT], const MatrixArg& m,
                                                int64_t n0, int64_t n_rows, int64_t c0, int lim,
                                                const float* xs) {
  const scalar_t* M = static_cast<const scalar_t*>(m.ptr);
  const int lane = threadIdx.x % 32;
  if constexpr (VEC16) {
    constexpr int V = kVec<scalar_t>;
    constexpr int G = 32 * V;
    for (int base = lane * V; base < lim; base += G) {
      float w[ROWS][V];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int64_t n = n0 + r;
        const scalar_t* src = M + n * m.s0 + c0 + base;
        if (n < n_rows && base + V <= lim) {
          load16(src, w[r]);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) w[r][q] = (n < n_rows && base + q < lim) ? to_float(src[q]) : 0.f;
        }
      }
      const float* xrow = xs + (base - lane * V) + lane;  // swizzled block of this vector
      if constexpr (std::is_same<scalar_t, float>::value) {
        // fp32: two-level sums (each vector's V products first, then into acc), which keeps the
        // float32 error within 2× cuBLAS's; a single chain per lane did not (H100, in = 2056).
        float part[ROWS][MAXT] = {};
#pragma unroll
        for (int q = 0; q < V; ++q)
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            const float xv = xrow[t * CHUNK + q * 32];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) part[r][t] += w[r][q] * xv;
          }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int t = 0; t < MAXT; ++t) acc[r][t] += part[r][t];
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q)
#pragma unroll
          for (int t = 0; t < MAXT; ++t) {
            const float xv = xrow[t * CHUNK + q * 32];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r][t] += w[r][q] * xv;
          }
      }
    }
  } else {
    for (int c = lane; c < lim; c += 32) {
      float w[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int64_t n = n0 + r;
        w[r] = n < n_rows ? load_at(M, n, c0 + c, m.s0, m.s1) : 0.f;
      }
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        const float xv = xs[t * CHUNK + c];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][t] += w[r] * xv;
      }
    }
  }
}

template <typename scalar_t, int MAXT>
__device__ void decode_z_block(const DecodeFwdParams& p, const DecodePlan& g, float* xs, int64_t zb) {
  constexpr int CHUNK = decode_chunk(MAXT);
  const scalar_t* x = static_cast<const scalar_t*>(p.x.ptr);
  const scalar_t* V = static_cast<const scalar_t*>(p.V.ptr);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t s = zb / g.col_tiles, c = zb % g.col_tiles;
  const int64_t i0 = s * g.split_rows;
  const int width = static_cast<int>(g.split_rows);                // <= CHUNK (decode_plan)
  const int rows = static_cast<int>(min(g.split_rows, p.in - i0));  // rows of this split
  const int64_t j = c * kZCols + lane;
  float* partial = p.workspace;                  // [splits][T][k]
  float* zd = p.workspace + g.splits * p.T * p.k;  // [T][k]

  // x[:, i0 : i0 + width] -> xs[t][0 : width], 0 past `in` and for t >= T.
  for (int t = 0; t < MAXT; ++t)
    for (int cc = threadIdx.x; cc < width; cc += kDecodeThreads)
      xs[t * CHUNK + cc] = (t < p.T && cc < rows) ? load_at(x, t, i0 + cc, p.x.s0, p.x.s1) : 0.f;
  __syncthreads();

  // V stays on element loads: lane l reads column c·32 + l, so with V.s1 == 1 a warp reads 32
  // consecutive elements of one row (64 or 128 contiguous bytes: coalesced, every sector fetched is
  // used). 16-byte loads along k would give each lane kVec columns, i.e. MAXT·kVec accumulators
  // (128 registers at MAXT 16 in fp16/bf16) plus a cross-lane reduction, for an operand of in·k
  // elements read once in all by >= SM-count blocks. Loads are kept in flight instead by taking
  // kZRowsPerStep independent rows per warp per step. Any strides (transposed V) take the same path.
  float acc[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.f;
  if (j < p.k) {
    for (int r0 = 0; r0 < rows; r0 += kZSplitGranule) {  // r0 + kZSplitGranule <= width
      float v[kZRowsPerStep];
#pragma unroll
      for (int q = 0; q < kZRowsPerStep; ++q) {
        const int ii = r0 + q * kDecodeWarps + warp;
        v[q] = ii < rows ? load_at(V, i0 + ii, j, p.V.s0, p.V.s1) : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kZRowsPerStep; ++q)
#pragma unroll
        for (int t = 0; t < MAXT; ++t) acc[t] += xs[t * CHUNK + r0 + q * kDecodeWarps + warp] * v[q];
    }
  }
  __syncthreads();  // xs is reused as the cross-warp reduction buffer red[warp][t][lane]
  float* red = xs;  // kDecodeWarps·MAXT·32 <= MAXT·CHUNK floats (DecodeConfig)
#pragma unroll
  for (int t = 0; t < MAXT; ++t) red[(warp * MAXT + t) * 32 + lane] = acc[t];
  __syncthreads();
  for (int idx = threadIdx.x; idx < MAXT * 32; idx += kDecodeThreads) {
    const int t = idx / 32, l = idx % 32;
    const int64_t jj = c * kZCols + l;
    if (t < p.T && jj < p.k) {
      float sum = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) sum += red[(w * MAXT + t) * 32 + l];
      partial[(s * p.T + t) * p.k + jj] = sum;
    }
  }

  // The last split of this column tile to arrive finishes it (threadFenceReduction pattern): every
  // thread's partial sums are made visible device-wide before thread 0 counts this split.
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last = atomicAdd(&p.counters[kCounterSplitsDone + c], 1) == static_cast<int>(g.splits - 1);
  }
  __syncthreads();  // also: every read of red above is done before it is written again below
  if (!is_last) return;
  __threadfence();

  // Warp w sums splits w, w + kDecodeWarps, ... in order (from L2: __ldcg, the other splits were
  // written by other blocks), then the warps' sums are added in warp order: a fixed order.
  float part[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) part[t] = 0.f;
  if (j < p.k) {
    for (int64_t s2 = warp; s2 < g.splits; s2 += kDecodeWarps) {
#pragma unroll
      for (int t = 0; t < MAXT; ++t)
        if (t < p.T) part[t] += __ldcg(partial + (s2 * p.T + t) * p.k + j);
    }
  }
#pragma unroll
  for (int t = 0; t < MAXT; ++t) red[(warp * MAXT + t) * 32 + lane] = part[t];
  __syncthreads();
  const scalar_t* d = static_cast<const scalar_t*>(p.d);
  scalar_t* z = static_cast<scalar_t*>(p.z);
  for (int idx = threadIdx.x; idx < MAXT * 32; idx += kDecodeThreads) {
    const int t = idx / 32, l = idx % 32;
    const int64_t jj = c * kZCols + l;
    if (t < p.T && jj < p.k) {
      float sum = 0.f;
      for (int w = 0; w < kDecodeWarps; ++w) sum += red[(w * MAXT + t) * 32 + l];
      float coeff;
      if (p.idx == nullptr) {
        coeff = to_float(d[jj * p.d_s]);
      } else {  // token t's row of the bank
        const int64_t a = bank_row(p.idx[t * p.idx_s], p.n);
        coeff = a >= 0 ? to_float(d[a * p.d_s0 + jj * p.d_s]) : bank_nan();
      }
      zd[t * p.k + jj] = sum * coeff;
      z[t * p.z_s0 + jj * p.z_s1] = from_float<scalar_t>(sum);
    }
  }
  // Publish z ⊙ d of this tile: every thread's writes are made visible before thread 0 counts it.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(&p.counters[kCounterTilesDone], 1);
}

template <typename scalar_t, int MAXT>
__device__ void decode_y_block(const DecodeFwdParams& p, const DecodePlan& g, float* xs, int64_t yb,
                               unsigned vec_flags) {
  constexpr int CHUNK = decode_chunk(MAXT);
  constexpr int ROWS = decode_rows_per_warp(MAXT);
  constexpr int V = kVec<scalar_t>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n0 = yb * decode_rows_per_block(MAXT) + warp * ROWS;  // this warp's first row

  float acc[ROWS][MAXT];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int t = 0; t < MAXT; ++t) acc[r][t] = 0.f;

  // Dense part: x·weightᵀ, each weight row read once, 16 bytes per lane when aligned.
  if (p.weight.ptr != nullptr) {
    const scalar_t* x = static_cast<const scalar_t*>(p.x.ptr);
    const bool vec = (vec_flags & kWeightVec16) != 0;
    for (int64_t c0 = 0; c0 < p.in; c0 += CHUNK) {
      const int lim = static_cast<int>(min(static_cast<int64_t>(CHUNK), p.in - c0));
      const auto load_x = [&](int t, int c) { return load_at(x, t, c0 + c, p.x.s0, p.x.s1); };
      __syncthreads();  // previous chunk fully consumed
      if (vec) stage_chunk<MAXT, CHUNK, true, V>(xs, p.T, lim, load_x);
      else stage_chunk<MAXT, CHUNK, false, V>(xs, p.T, lim, load_x);
      __syncthreads();
      if (vec) accumulate_rows<scalar_t, MAXT, CHUNK, ROWS, true>(acc, p.weight, n0, p.out, c0, lim, xs);
      else accumulate_rows<scalar_t, MAXT, CHUNK, ROWS, false>(acc, p.weight, n0, p.out, c0, lim, xs);
    }
  }

  // Wait until every z tile is finished (z blocks hold lower tickets, see above).
  if (threadIdx.x == 0) {
    const volatile int* ready = p.counters + kCounterTilesDone;
    while (*ready < static_cast<int>(g.col_tiles)) __nanosleep(64);
    __threadfence();
  }
  __syncthreads();

  // Low-rank part: (z ⊙ d)·Uᵀ, z ⊙ d read from L2 (written by other blocks in this launch), U
  // streamed like weight: 16-byte loads along k when U.s1 == 1, U.s0 % kVec == 0 and U is 16-byte
  // aligned (chunk starts j0 are multiples of kVec), element loads otherwise.
  const float* zd = p.workspace + g.splits * p.T * p.k;
  const bool uvec = (vec_flags & kUVec16) != 0;
  for (int64_t j0 = 0; j0 < p.k; j0 += CHUNK) {
    const int lim = static_cast<int>(min(static_cast<int64_t>(CHUNK), p.k - j0));
    const auto load_zd = [&](int t, int c) { return __ldcg(zd + t * p.k + j0 + c); };
    __syncthreads();
    if (uvec) stage_chunk<MAXT, CHUNK, true, V>(xs, p.T, lim, load_zd);
    else stage_chunk<MAXT, CHUNK, false, V>(xs, p.T, lim, load_zd);
    __syncthreads();
    if (uvec) accumulate_rows<scalar_t, MAXT, CHUNK, ROWS, true>(acc, p.U, n0, p.out, j0, lim, xs);
    else accumulate_rows<scalar_t, MAXT, CHUNK, ROWS, false>(acc, p.U, n0, p.out, j0, lim, xs);
  }

  // Sum the lanes; lane t writes token t (butterfly: every lane holds every sum).
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  scalar_t* y = static_cast<scalar_t*>(p.y);
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
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
spectral_linear_decode_fwd_kernel(const DecodeFwdParams p, const DecodePlan g, unsigned vec_flags) {
  static_assert(sizeof(DecodeConfig<MAXT>) > 0, "instantiates the static_asserts of DecodeConfig");
  __shared__ float xs[MAXT * decode_chunk(MAXT)];
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(&p.counters[kCounterTickets], 1);
  __syncthreads();
  if (ticket < g.z_blocks) {
    decode_z_block<scalar_t, MAXT>(p, g, xs, ticket);
  } else {
    decode_y_block<scalar_t, MAXT>(p, g, xs, ticket - g.z_blocks, vec_flags);
  }

  // Counter reset. Thread 0 made every access of this block to the counters (ticket, split and
  // tile counts, the wait on the tile count), all before this point in its program order. The fence
  // orders them before the increment of "blocks done"; the block that sees blocks - 1 has
  // observed every other block's increment (an RMW chain on one address), and its fence orders its
  // stores after them, hence after every other access to the counters in this launch. Nothing
  // touches them afterwards: they are zero when the kernel ends.
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(&p.counters[kCounterBlocksDone], 1) == static_cast<int>(g.blocks - 1)) {
      __threadfence();
      for (int64_t i = 0; i < g.n_int; ++i) p.counters[i] = 0;
    }
  }
}

// 16-byte row loads of a [rows, cols] operand: unit column stride, row pitch a multiple of kVec
// elements, 16-byte aligned base (the chunk starts are multiples of kVec).
template <typename scalar_t>
bool rows_take_vec16(const MatrixArg& m) {
  return m.ptr != nullptr && m.s1 == 1 && m.s0 % kVec<scalar_t> == 0 &&
         reinterpret_cast<uintptr_t>(m.ptr) % 16 == 0;
}

template <typename scalar_t, int MAXT>
void launch_decode(const DecodeFwdParams& p, const DecodePlan& g, cudaStream_t stream) {
  const unsigned vec_flags = (rows_take_vec16<scalar_t>(p.weight) ? kWeightVec16 : 0u) |
                             (rows_take_vec16<scalar_t>(p.U) ? kUVec16 : 0u);
  spectral_linear_decode_fwd_kernel<scalar_t, MAXT>
      <<<static_cast<unsigned>(g.blocks), kDecodeThreads, 0, stream>>>(p, g, vec_flags);
  check_launch("spectral_linear_decode_fwd", stream);
}

// ===================================================================================================
// mma plan: out[M, N] = a1·b1 + (a2 ⊙ scale)·b2 + bias
// ===================================================================================================
// 64×64 output tile per block; the two products walk K in turn into the same fp32 accumulators,
// so y is written once (the fused low-rank plan of DESIGN.md §3). Single-buffered: a tile is loaded
// to shared memory, then consumed; no cp.async pipeline yet.
constexpr int kBM = 64, kBN = 64;

// The rows of a bank of scales (adapter banks), or none (index null): a2's row m is scaled by
// scale[scale_index[m]].
__device__ __forceinline__ TileScaleBank scale_bank(const LowRankGemmParams& p) {
  TileScaleBank b;
  b.index = p.scale_index;
  b.index_s = p.scale_index_s;
  b.s0 = p.scale_s0;
  b.rows = p.scale_rows;
  return b;
}

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
    const TileScaleBank bank = scale_bank(p);
    for (int64_t k0 = 0; k0 < K; k0 += kMmaBK) {
      load_tile<scalar_t, scalar_t, kBM, kMmaBK, kLdA, false>(As, A, a.s0, a.s1, m0, k0, p.M, K,
                                                              scale, p.scale_s, bank);
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
  float comp[4][4] = {};  // Kahan compensation of acc

  for (int seg = 0; seg < 2; ++seg) {
    const MatrixArg& a = seg == 0 ? p.a1 : p.a2;
    const MatrixArg& b = seg == 0 ? p.b1 : p.b2;
    const int64_t K = seg == 0 ? p.K1 : p.K2;
    if (a.ptr == nullptr || K == 0) continue;
    const float* A = static_cast<const float*>(a.ptr);
    const float* B = static_cast<const float*>(b.ptr);
    const float* scale = seg == 1 ? static_cast<const float*>(p.scale) : nullptr;
    const TileScaleBank bank = scale_bank(p);
    for (int64_t k0 = 0; k0 < K; k0 += kFmaBK) {
      load_tile<float, float, kBM, kFmaBK, kLdF, true>(As, A, a.s0, a.s1, m0, k0, p.M, K, scale, p.scale_s,
                                                       bank);
      load_tile<float, float, kFmaBK, kBN, kLdF, false>(Bs, B, b.s0, b.s1, k0, n0, K, p.N, nullptr, 0);
      __syncthreads();
      // Two-level sum: each kFmaBK-long chain starts from zero and is then added to acc with
      // compensation (one chain over all of K gave 2-3× cuBLAS's float32 error on an H100, and a
      // plain two-level sum still 2.4× at K = 300; nvcc does not reassociate without fast-math).
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
        for (int j = 0; j < 4; ++j) {
          const float y = part[i][j] - comp[i][j];
          const float t = acc[i][j] + y;
          comp[i][j] = (t - acc[i][j]) - y;
          acc[i][j] = t;
        }
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
DecodePlan decode_plan(int64_t T, int64_t in, int64_t out, int64_t k, int sm_count) {
  const int max_t = decode_max_t(T);
  DecodePlan g;
  g.col_tiles = ceil_div(k, kZCols);
  // Split size: z blocks (splits · col_tiles) at least as many as multiprocessors where `in` has
  // rows enough, with split_rows a multiple of kZSplitGranule (whole steps of kZRowsPerStep rows per
  // warp) and at most the chunk that xs holds. First the even split into `want` parts rounded up
  // to the granule; if rounding up left fewer than `want` splits, the even split rounded down (at
  // least the granule, which gives as many splits as `in` allows).
  const int64_t want = ceil_div(sm_count > 0 ? sm_count : 1, g.col_tiles);
  int64_t rows = ceil_div(ceil_div(in, want), kZSplitGranule) * kZSplitGranule;
  if (ceil_div(in, rows) < want) {
    rows = in / want / kZSplitGranule * kZSplitGranule;
    if (rows < kZSplitGranule) rows = kZSplitGranule;
  }
  if (rows > decode_chunk(max_t)) rows = decode_chunk(max_t);
  g.split_rows = rows;
  g.splits = ceil_div(in, rows);
  g.z_blocks = g.splits * g.col_tiles;
  g.rows_per_block = decode_rows_per_block(max_t);
  g.y_blocks = ceil_div(out, g.rows_per_block);
  g.blocks = g.z_blocks + g.y_blocks;
  g.n_float = (g.splits + 1) * T * k;        // partial sums [splits][T][k], then z ⊙ d [T][k]
  g.n_int = kDecodeFixedCounters + g.col_tiles;  // tickets, tiles done, blocks done, per-tile splits
  return g;
}

int decode_sm_count(int device, const char* what) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cached[kCachedDevices];  // static storage: zero-initialised; 0 = unread
  const bool cacheable = device >= 0 && device < kCachedDevices;
  if (cacheable) {
    const int n = cached[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky; keep it from being reported by a later launch check
    throw std::runtime_error(std::string(what) + ": CUDA error " + cuda_error_text(err) +
                             " reading the multiprocessor count of device " + std::to_string(device));
  }
  if (n <= 0) {
    throw std::runtime_error(std::string(what) + ": device " + std::to_string(device) +
                             " reports " + std::to_string(n) + " multiprocessors");
  }
  if (cacheable) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

void decode_workspace_sizes(int64_t T, int64_t in, int64_t k, int device, int64_t* n_float,
                            int64_t* n_int) {
  const DecodePlan g =
      decode_plan(T, in, /*out=*/1, k, decode_sm_count(device, "decode_workspace_sizes"));
  *n_float = g.n_float;
  *n_int = g.n_int;
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
  if (p.idx != nullptr) {
    SK_CHECK_ARG(p.n > 0, "adapter_index", "needs a bank d of n > 0 rows, got n = " + std::to_string(p.n));
    SK_CHECK_ARG(p.idx_s >= 0 && p.d_s0 >= 0, "adapter_index", "strides must be non-negative");
  }
  // The plan of the device the launch goes to (the current one): the same function as
  // decode_workspace_sizes, so a workspace sized for this device fits; one that does not is refused.
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("spectral_linear_decode_fwd: CUDA error " + cuda_error_text(err) +
                             " reading the current device");
  }
  const DecodePlan g =
      decode_plan(p.T, p.in, p.out, p.k, decode_sm_count(device, "spectral_linear_decode_fwd"));
  SK_CHECK_ARG(g.blocks <= INT_MAX, "out", "too many rows for one launch");
  SK_CHECK_ARG(p.workspace_floats >= g.n_float, "workspace",
               "holds " + std::to_string(p.workspace_floats) + " fp32 values, the launch needs " +
                   std::to_string(g.n_float) + " (decode_workspace_sizes)");
  SK_CHECK_ARG(p.counter_ints >= g.n_int, "counters",
               "holds " + std::to_string(p.counter_ints) + " int32 values, the launch needs " +
                   std::to_string(g.n_int) + " (decode_workspace_sizes)");
  auto stream = static_cast<cudaStream_t>(stream_handle);
  const int max_t = decode_max_t(p.T);  // the instantiation decode_plan planned for
  SK_DISPATCH_DTYPE(p.dtype, scalar_t, [&] {
    if (max_t == 1) launch_decode<scalar_t, 1>(p, g, stream);
    else if (max_t == 4) launch_decode<scalar_t, 4>(p, g, stream);
    else launch_decode<scalar_t, 16>(p, g, stream);
  });
}

void launch_lowrank_gemm(const LowRankGemmParams& p, void* stream_handle) {
  CHECK_POSITIVE(p.M);
  CHECK_POSITIVE(p.N);
  SK_CHECK_ARG(p.K1 >= 0 && p.K2 >= 0, "K", "must be non-negative");
  SK_CHECK_ARG(p.out != nullptr, "out", "null device pointer");
  SK_CHECK_ARG(p.a1.ptr == nullptr || p.b1.ptr != nullptr, "b1", "null device pointer with a1 given");
  SK_CHECK_ARG(p.a2.ptr == nullptr || p.b2.ptr != nullptr, "b2", "null device pointer with a2 given");
  if (p.scale_index != nullptr) {
    SK_CHECK_ARG(p.scale != nullptr, "scale_index", "given without a bank of scales");
    SK_CHECK_ARG(p.scale_rows > 0, "scale_index",
                 "needs a bank of n > 0 rows, got n = " + std::to_string(p.scale_rows));
    SK_CHECK_ARG(p.scale_index_s >= 0 && p.scale_s0 >= 0, "scale_index", "strides must be non-negative");
  }
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
