// Tile loaders shared by the GEMM kernels of both directions.
#pragma once

#include "cuda_utils.cuh"

namespace spectral_kernels {

// Per-row scale rows of an adapter bank: row gr of the source is scaled by
// scale[index[gr]] ([rows, ncols], row stride s0) instead of one scale vector. index null: no bank.
struct TileScaleBank {
  const int64_t* index = nullptr;
  int64_t index_s = 0, s0 = 0, rows = 0;
};

// tile[r][c] = src(r0 + r, c0 + c) · scale[c0 + c] (scale optional), zero past nrows / ncols; with
// bank.index, scale[bank.index[r0 + r]][c0 + c] (a NaN factor for an index outside the bank).
// The tile is stored with row pitch LD, or transposed (tile[c][r], pitch LD) when TRANSPOSED.
// Threads walk the tile along whichever source dimension has unit stride, so global reads coalesce
// for row-major and column-major (transposed-view) operands alike.
template <typename scalar_t, typename smem_t, int ROWS, int COLS, int LD, bool TRANSPOSED>
__device__ __forceinline__ void load_tile(smem_t* tile, const scalar_t* src, int64_t s0, int64_t s1,
                                          int64_t r0, int64_t c0, int64_t nrows, int64_t ncols,
                                          const scalar_t* scale, int64_t scale_s,
                                          const TileScaleBank& bank = TileScaleBank()) {
  const bool cols_fastest = !(s0 == 1 && s1 != 1);
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += blockDim.x) {
    const int r = cols_fastest ? idx / COLS : idx % ROWS;
    const int c = cols_fastest ? idx % COLS : idx / ROWS;
    const int64_t gr = r0 + r, gc = c0 + c;
    float v = 0.f;
    if (gr < nrows && gc < ncols) {
      v = to_float(src[gr * s0 + gc * s1]);
      if (scale != nullptr) {
        if (bank.index == nullptr) {
          v *= to_float(scale[gc * scale_s]);
        } else {
          const int64_t a = bank_row(bank.index[gr * bank.index_s], bank.rows);
          v *= a >= 0 ? to_float(scale[a * bank.s0 + gc * scale_s]) : bank_nan();
        }
      }
    }
    tile[TRANSPOSED ? c * LD + r : r * LD + c] = from_float<smem_t>(v);
  }
}

}  // namespace spectral_kernels
