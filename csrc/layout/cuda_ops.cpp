// CUDA registration of dtk::tile_reorder: argument checks, then the plain launcher in cuda.cu on
// the current stream. Only c10/cuda headers (ATen/cuda/CUDAContext.h needs the cuBLAS/cuSPARSE
// headers, which a bare toolkit may lack).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/debug.h"
#include "layout/cuda.h"
#include "layout/tile_reorder.h"

namespace dtk {
namespace {

at::Tensor tile_reorder_cuda(const at::Tensor& x_in, at::IntArrayRef grid, at::IntArrayRef tile, int64_t num_prefix,
                             bool inverse) {
  const TileLayout layout = check_tile_reorder_args(x_in, grid, tile, num_prefix);
  TORCH_CHECK(x_in.device().is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x_in.device());
  TORCH_CHECK_VALUE(x_in.size(1) <= std::numeric_limits<int32_t>::max(),
                    "x must have fewer than 2^31 tokens (x.shape[1]) on CUDA, got ", x_in.size(1));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = trailing_contiguous(x_in) ? x_in : x_in.contiguous();
  at::Tensor out = new_output(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const int64_t B = x.size(0), S = x.size(1);
  const int64_t es = x.element_size();
  const int64_t row_bytes = (x.numel() / (B * S)) * es;
  const int64_t g[3] = {layout.n0, layout.n1, layout.n2};
  const int64_t t[3] = {layout.u0, layout.u1, layout.u2};
  launch_tile_reorder(x.const_data_ptr(), out.mutable_data_ptr(), B, S, num_prefix, row_bytes, x.stride(0) * es,
                      x.stride(1) * es, g, t, inverse, c10::cuda::getCurrentCUDAStream(x.device().index()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CUDA, m) { m.impl("tile_reorder", &dtk::tile_reorder_cuda); }
