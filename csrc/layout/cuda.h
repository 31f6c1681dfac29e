// Plain launcher of the CUDA tile_reorder kernel (no torch types, so cuda.cu compiles without
// torch headers). Implemented in cuda.cu, called by cuda_ops.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace dtk {

// dst (contiguous (batch, seq, row_bytes)) = src with the grid tokens of each batch moved
// row-major -> tile order (inverse = false) or back (inverse = true); prefix rows are copied.
// src rows are row_bytes contiguous bytes at src + b * src_stride_b + s * src_stride_s (bytes).
// grid/tile: 3 sizes each (tile clipped to the grid); prod(grid) < 2^31.
void launch_tile_reorder(const void* src, void* dst, int64_t batch, int64_t seq, int64_t num_prefix,
                         int64_t row_bytes, int64_t src_stride_b, int64_t src_stride_s, const int64_t grid[3],
                         const int64_t tile[3], bool inverse, cudaStream_t stream);

}  // namespace dtk
