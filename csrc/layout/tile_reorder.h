// Argument checks of dtk::tile_reorder shared by the CPU and CUDA wrappers (host only).
#pragma once
#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/layout.h"

namespace dtk {

// Validates (x, grid, tile, num_prefix); returns the grid layout (tile padded and clipped).
inline TileLayout check_tile_reorder_args(const at::Tensor& x, at::IntArrayRef grid, at::IntArrayRef tile,
                                          int64_t num_prefix) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must have at least 2 dims (batch, seq, ...), got shape ", x.sizes());
  const auto g = check_grid(grid);
  check_num_prefix(num_prefix);
  const TileLayout layout = check_tile(at::OptionalIntArrayRef(tile), grid, g);
  check_grid_matches_seq(grid, g, num_prefix, x.size(1), "S (x.shape[1])");
  return layout;
}

// True when dims 2.. of x are laid out contiguously (so a (batch, seq) row is one block of memory).
inline bool trailing_contiguous(const at::Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

}  // namespace dtk
