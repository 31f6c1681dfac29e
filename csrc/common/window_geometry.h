// Window geometry (normative: python/dtk/ops/window/spec.py): argument normalisation and the
// per-axis key ranges of a box window or a circle, on a grid padded to 3 axes.
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "common/checks.h"
#include "common/layout.h"

namespace dtk {

// Radii above this are rejected (keeps squared distances inside int64).
constexpr int64_t kMaxRadius = int64_t(1) << 30;

struct WindowGeometry {
  int ndim = 0;                        // real grid axes (1..3); axes < 3 - ndim are padding
  std::array<int64_t, 3> grid{1, 1, 1};
  bool circle = false;
  std::array<int64_t, 3> window{1, 1, 1};  // normalised box sizes (circle: unused)
  int64_t radius = 0;
  bool inward = true;
  int64_t num_prefix = 0;
  TileLayout layout{};                 // tile == grid for row-major
  bool tiled = false;

  int64_t num_grid() const { return grid[0] * grid[1] * grid[2]; }
  bool padded(int a) const { return a < 3 - ndim; }

  // Inclusive key range on axis a for a query at coordinate p; for circles also the centre.
  void axis_range(int a, int64_t p, int64_t& lo, int64_t& hi, int64_t& centre) const {
    const int64_t n = grid[a];
    if (!circle) {
      const int64_t w = window[a];
      if (inward) {
        lo = max64(min64(p - w / 2, n - w), 0);
        hi = lo + (w - 1);
      } else {
        lo = max64(min64(p - w / 2, n - 1), 0);
        hi = max64(min64(p + (w - 1 - w / 2), n - 1), 0);
      }
      centre = p;
      return;
    }
    const int64_t r = radius;
    centre = (!inward || padded(a)) ? p : max64(min64(p, n - r), r - 1);
    lo = max64(min64(centre - (r - 1), n - 1), 0);
    hi = max64(min64(centre + (r - 1), n - 1), 0);
  }

  // Token index (0-based within the grid tokens) of the key at coordinates c.
  int64_t token(Coord3 c) const { return tiled ? layout.index(c) : layout.row_major_index(c); }
  Coord3 coords(int64_t g) const { return tiled ? layout.coords(g) : layout.row_major_coords(g); }
};

// Validates and normalises the geometry arguments of window attention for a sequence of seq_len.
inline WindowGeometry parse_window_geometry(at::IntArrayRef grid, at::OptionalIntArrayRef window,
                                            std::optional<int64_t> radius, const std::string& border,
                                            int64_t num_prefix, at::OptionalIntArrayRef tile,
                                            int64_t seq_len, const char* seq_name) {
  WindowGeometry geo;
  geo.grid = check_grid(grid);
  geo.ndim = static_cast<int>(grid.size());
  TORCH_CHECK_VALUE(border == "inward" || border == "clip", "border must be 'inward' or 'clip', got '", border, "'");
  geo.inward = border == "inward";
  TORCH_CHECK_VALUE(window.has_value() != radius.has_value(),
                    "exactly one of window (a box) and radius (a circle) must be given, got ",
                    window.has_value() ? "both" : "neither");
  check_num_prefix(num_prefix);
  geo.num_prefix = num_prefix;
  check_grid_matches_seq(grid, geo.grid, num_prefix, seq_len, seq_name);
  if (window.has_value()) {
    const at::IntArrayRef w = *window;
    TORCH_CHECK_VALUE(w.size() == grid.size(), "window must have one size per grid axis (", grid.size(),
                      " for grid=", grid, "), got window=", w);
    const size_t pad = 3 - w.size();
    for (size_t a = 0; a < w.size(); ++a) {
      TORCH_CHECK_VALUE(w[a] >= 1 || w[a] == -1, "window sizes must be >= 1, or -1 for the whole axis, got window=", w);
      const int64_t n = geo.grid[pad + a];
      // -1: the whole axis (N under "inward", 2N-1 under "clip"); inward windows are capped at N.
      geo.window[pad + a] = geo.inward ? (w[a] == -1 ? n : std::min(w[a], n)) : (w[a] == -1 ? 2 * n - 1 : w[a]);
    }
  } else {
    TORCH_CHECK_VALUE(*radius >= 1 && *radius <= kMaxRadius, "radius must be an int >= 1 (and <= 2^30), got ", *radius);
    geo.circle = true;
    geo.radius = *radius;
  }
  geo.layout = check_tile(tile, grid, geo.grid);
  geo.tiled = tile.has_value();
  return geo;
}

}  // namespace dtk
