// CUDA kernel of dtk::tile_reorder: one row (all trailing elements of one token) per group of
// threads, copied with the widest vector the alignment allows. No torch headers here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cutlass/fast_math.h"
#include "layout/cuda.h"

namespace dtk {
namespace {

struct ReorderParams {
  const char* src;
  char* dst;
  int64_t src_stride_b, src_stride_s;  // bytes
  int64_t dst_stride_b, dst_stride_s;  // bytes (dst is contiguous)
  int64_t rows;                        // batch * seq
  int64_t nvec;                        // vectors per row
  int num_prefix;                      // < seq <= 2^31 - 1
  int n0, n1, n2, u0, u1, u2;
  cutlass::FastDivmodU64 div_seq;      // row -> (b, s)
  cutlass::FastDivmod div_n1, div_n2;  // grid index -> coordinates
  cutlass::FastDivmod div_u0, div_u1, div_u2;
  bool inverse;
};

template <typename VecT, int kThreadsPerRow>
__global__ void __launch_bounds__(256) tile_reorder_kernel(const ReorderParams p) {
  constexpr int kRowsPerBlock = 256 / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow; row < p.rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    uint64_t s_u;
    const int64_t b = int64_t(p.div_seq.divmod(s_u, uint64_t(row)));
    const int s = int(s_u);
    int64_t from = s, to = s;
    if (s >= p.num_prefix) {
      const int r = s - p.num_prefix;  // row-major grid index
      int q, x0, x1, x2;
      p.div_n2(q, x2, r);
      p.div_n1(x0, x1, q);
      int t0, t1, t2, l0, l1, l2;
      p.div_u0(t0, l0, x0);
      p.div_u1(t1, l1, x1);
      p.div_u2(t2, l2, x2);
      const int64_t h0 = min(p.u0, p.n0 - t0 * p.u0);  // extents of the tile holding the token
      const int64_t h1 = min(p.u1, p.n1 - t1 * p.u1);
      const int64_t h2 = min(p.u2, p.n2 - t2 * p.u2);
      const int64_t pos = int64_t(t0) * p.u0 * p.n1 * p.n2 + h0 * (int64_t(t1) * p.u1 * p.n2) +
                          h0 * h1 * (int64_t(t2) * p.u2) + l0 * h1 * h2 + l1 * h2 + l2;
      from = p.num_prefix + (p.inverse ? pos : r);
      to = p.num_prefix + (p.inverse ? r : pos);
    }
    const VecT* __restrict__ src = reinterpret_cast<const VecT*>(p.src + b * p.src_stride_b + from * p.src_stride_s);
    VecT* __restrict__ dst = reinterpret_cast<VecT*>(p.dst + b * p.dst_stride_b + to * p.dst_stride_s);
    for (int64_t j = lane; j < p.nvec; j += kThreadsPerRow) dst[j] = src[j];
  }
}

template <typename VecT>
void launch_vec(const ReorderParams& p, cudaStream_t stream) {
  const int64_t nvec = p.nvec;
  const int64_t max_blocks = int64_t(1) << 20;  // grid-stride loop beyond this
  auto blocks = [&](int rows_per_block) {
    const int64_t n = (p.rows + rows_per_block - 1) / rows_per_block;
    return unsigned(n < max_blocks ? n : max_blocks);
  };
  if (nvec <= 1) tile_reorder_kernel<VecT, 1><<<blocks(256), 256, 0, stream>>>(p);
  else if (nvec <= 4) tile_reorder_kernel<VecT, 4><<<blocks(64), 256, 0, stream>>>(p);
  else if (nvec <= 16) tile_reorder_kernel<VecT, 16><<<blocks(16), 256, 0, stream>>>(p);
  else if (nvec <= 64) tile_reorder_kernel<VecT, 64><<<blocks(4), 256, 0, stream>>>(p);
  else tile_reorder_kernel<VecT, 256><<<blocks(1), 256, 0, stream>>>(p);
}

}  // namespace

void launch_tile_reorder(const void* src, void* dst, int64_t batch, int64_t seq, int64_t num_prefix,
                         int64_t row_bytes, int64_t src_stride_b, int64_t src_stride_s, const int64_t grid[3],
                         const int64_t tile[3], bool inverse, cudaStream_t stream) {
  const int64_t rows = batch * seq;
  if (rows == 0 || row_bytes == 0) return;
  ReorderParams p;
  p.src = static_cast<const char*>(src);
  p.dst = static_cast<char*>(dst);
  p.src_stride_b = src_stride_b;
  p.src_stride_s = src_stride_s;
  p.dst_stride_b = seq * row_bytes;
  p.dst_stride_s = row_bytes;
  p.rows = rows;
  p.num_prefix = int(num_prefix);
  p.n0 = int(grid[0]), p.n1 = int(grid[1]), p.n2 = int(grid[2]);
  p.u0 = int(tile[0]), p.u1 = int(tile[1]), p.u2 = int(tile[2]);
  p.div_seq = cutlass::FastDivmodU64(uint64_t(seq));
  p.div_n1 = cutlass::FastDivmod(p.n1);
  p.div_n2 = cutlass::FastDivmod(p.n2);
  p.div_u0 = cutlass::FastDivmod(p.u0);
  p.div_u1 = cutlass::FastDivmod(p.u1);
  p.div_u2 = cutlass::FastDivmod(p.u2);
  p.inverse = inverse;
  // Widest vector dividing every address and the row length.
  const uint64_t bits = uint64_t(reinterpret_cast<uintptr_t>(src)) | uint64_t(reinterpret_cast<uintptr_t>(dst)) |
                        uint64_t(row_bytes) | uint64_t(src_stride_b) | uint64_t(src_stride_s);
  if (bits % 16 == 0) {
    p.nvec = row_bytes / 16;
    launch_vec<uint4>(p, stream);
  } else if (bits % 8 == 0) {
    p.nvec = row_bytes / 8;
    launch_vec<uint2>(p, stream);
  } else if (bits % 4 == 0) {
    p.nvec = row_bytes / 4;
    launch_vec<uint32_t>(p, stream);
  } else if (bits % 2 == 0) {
    p.nvec = row_bytes / 2;
    launch_vec<uint16_t>(p, stream);
  } else {
    p.nvec = row_bytes;
    launch_vec<uint8_t>(p, stream);
  }
}

}  // namespace dtk
