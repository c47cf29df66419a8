// Tile loaders shared by the GEMM kernels of both directions.
#pragma once

#include "cuda_utils.cuh"

namespace spectral_kernels {

// tile[r][c] = src(r0 + r, c0 + c) · scale[c0 + c] (scale optional), zero past nrows / ncols.
// The tile is stored with row pitch LD, or transposed (tile[c][r], pitch LD) when TRANSPOSED.
// Threads walk the tile along whichever source dimension has unit stride, so global reads coalesce
// for row-major and column-major (transposed-view) operands alike.
template <typename scalar_t, typename smem_t, int ROWS, int COLS, int LD, bool TRANSPOSED>
__device__ __forceinline__ void load_tile(smem_t* tile, const scalar_t* src, int64_t s0, int64_t s1,
                                          int64_t r0, int64_t c0, int64_t nrows, int64_t ncols,
                                          const scalar_t* scale, int64_t scale_s) {
  const bool cols_fastest = !(s0 == 1 && s1 != 1);
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += blockDim.x) {
    const int r = cols_fastest ? idx / COLS : idx % ROWS;
    const int c = cols_fastest ? idx % COLS : idx / ROWS;
    const int64_t gr = r0 + r, gc = c0 + c;
    float v = 0.f;
    if (gr < nrows && gc < ncols) {
      v = to_float(src[gr * s0 + gc * s1]);
      if (scale != nullptr) v *= to_float(scale[gc * scale_s]);
    }
    tile[TRANSPOSED ? c * LD + r : r * LD + c] = from_float<smem_t>(v);
  }
}

}  // namespace spectral_kernels
