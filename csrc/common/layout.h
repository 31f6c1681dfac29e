// Token layout of a 3D grid (grids of 1..2 axes are padded with leading 1s): row-major
// coordinates <-> position in tile order. Tiles are row-major over the tile grid, tokens
// row-major inside a tile; edge tiles are partial. Closed forms identical to
// python/dtk/ops/layout/tiles.py::tile_order_index. Torch-free, usable from host and device code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DTK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DTK_HOST_DEVICE inline
#endif

namespace dtk {

struct Coord3 {
  int64_t x0, x1, x2;
};

DTK_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
DTK_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Grid (n0, n1, n2) and tile (u0, u1, u2) with 1 <= u_a <= n_a. Row-major is tile == grid.
struct TileLayout {
  int64_t n0, n1, n2;
  int64_t u0, u1, u2;

  DTK_HOST_DEVICE int64_t size() const { return n0 * n1 * n2; }

  DTK_HOST_DEVICE Coord3 row_major_coords(int64_t r) const {
    const int64_t x2 = r % n2;
    const int64_t q = r / n2;
    return {q / n1, q % n1, x2};
  }
  DTK_HOST_DEVICE int64_t row_major_index(Coord3 c) const { return (c.x0 * n1 + c.x1) * n2 + c.x2; }

  // Position in tile order of the token at coordinates c.
  DTK_HOST_DEVICE int64_t index(Coord3 c) const {
    const int64_t t0 = c.x0 / u0, t1 = c.x1 / u1, t2 = c.x2 / u2;
    const int64_t h0 = min64(n0 - t0 * u0, u0);  // extents of the tile holding the token
    const int64_t h1 = min64(n1 - t1 * u1, u1);
    const int64_t h2 = min64(n2 - t2 * u2, u2);
    const int64_t before = t0 * u0 * n1 * n2 + h0 * (t1 * u1 * n2) + h0 * h1 * (t2 * u2);
    return before + (c.x0 - t0 * u0) * h1 * h2 + (c.x1 - t1 * u1) * h2 + (c.x2 - t2 * u2);
  }

  // Inverse of index(): coordinates of the token stored at tile-order position pos.
  DTK_HOST_DEVICE Coord3 coords(int64_t pos) const {
    const int64_t slab = u0 * n1 * n2;          // a full row of tiles along axis 0
    const int64_t t0 = pos / slab;
    pos -= t0 * slab;
    const int64_t h0 = min64(n0 - t0 * u0, u0);
    const int64_t band = h0 * u1 * n2;          // a full row of tiles along axis 1 in this slab
    const int64_t t1 = pos / band;
    pos -= t1 * band;
    const int64_t h1 = min64(n1 - t1 * u1, u1);
    const int64_t cell = h0 * h1 * u2;          // a full tile along axis 2
    const int64_t t2 = pos / cell;
    pos -= t2 * cell;
    const int64_t h2 = min64(n2 - t2 * u2, u2);
    const int64_t l0 = pos / (h1 * h2);
    pos -= l0 * h1 * h2;
    const int64_t l1 = pos / h2;
    return {t0 * u0 + l0, t1 * u1 + l1, t2 * u2 + (pos - l1 * h2)};
  }
};

}  // namespace dtk
