// CPU kernel of dtk::tile_reorder: moves the grid tokens (dim 1, after num_prefix) of x between
// row-major and tile order; rows of trailing elements are copied whole (any dtype).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "common/debug.h"
#include "layout/tile_reorder.h"

namespace dtk {
namespace {

at::Tensor tile_reorder_cpu(const at::Tensor& x_in, at::IntArrayRef grid, at::IntArrayRef tile, int64_t num_prefix,
                            bool inverse) {
  const TileLayout layout = check_tile_reorder_args(x_in, grid, tile, num_prefix);
  TORCH_CHECK(x_in.device().is_cpu(), "x must be a CPU tensor for the CPU kernel, got ", x_in.device());
  // Rows must be contiguous blocks; any batch/seq strides are fine, other layouts are copied once.
  const at::Tensor x = trailing_contiguous(x_in) ? x_in : x_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), S = x.size(1), P = num_prefix;
  const int64_t row_bytes = (x.numel() / (B * S)) * static_cast<int64_t>(x.element_size());
  const int64_t es = x.element_size();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t sb = x.stride(0) * es, ss = x.stride(1) * es;
  const int64_t db = S * row_bytes, ds = row_bytes;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, B * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / S, s = i % S;
      int64_t from = s, to = s;
      if (s >= P) {
        const int64_t r = s - P;  // row-major grid index
        const int64_t pos = layout.index(layout.row_major_coords(r));
        from = P + (inverse ? pos : r);
        to = P + (inverse ? r : pos);
      }
      std::memcpy(dst + b * db + to * ds, src + b * sb + from * ss, static_cast<size_t>(row_bytes));
    }
  });
  return out;
}

}  // namespace
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CPU, m) { m.impl("tile_reorder", &dtk::tile_reorder_cpu); }
