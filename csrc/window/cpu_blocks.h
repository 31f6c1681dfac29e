// CPU engine of dtk::window_attention and of its backward, block-based so the heavy work runs as
// small dense GEMMs. A block is a box of nearby grid queries (in any token layout) or a run of
// prefix queries, taken with all the q heads of one kv head's GQA group. The keys a block may see
// (prefix keys, the bounding box of its queries' windows enumerated analytically from the
// geometry, extra keys; all S keys for prefix queries) are gathered chunk by chunk into opmath
// scratch by one BlockWalker, which also gives each query's exact allowed columns in the chunk.
// Forward, per chunk: scores = Q K^T (one GEMM), the mask, an online-softmax step (one vectorised
// exp over the tile), acc += P V (one GEMM); a work item is (batch, query block, kv head).
// Backward, per chunk: P recomputed from the lse, then dP, dS and the dQ, dK, dV GEMMs; dK and dV
// rows go back to their keys, so a work item is a whole (batch, kv head) (disjoint outputs, no races).
// GEMMs, exp and sums are ATen's CPU kernels (BLAS, runtime ISA dispatch), called directly through
// at::cpu:: (no dispatcher round trip per block).
// Memory per thread: O(group * block * (chunk + D) + chunk * D), plus O((S + E) * D) for the
// backward's dK, dV; never an S x S mask, no input copies.
// This header holds what the forward (cpu_forward.cpp) and the backward (cpu_backward.cpp) share:
// the block shapes, the block walker and the block plan.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/exp_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/sum_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/debug.h"
#include "common/window_geometry.h"

namespace dtk {
namespace window_cpu {


constexpr int64_t kMaxBlock = 64;   // queries per block (GEMM rows, times the GQA group)
constexpr int64_t kKeyChunk = 512;  // keys per chunk (columns of the score GEMM)

// ---------------------------------------------------------------------------------------------
// Math helpers.

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest t >= 0 with t*t < x (x >= 1).
inline int64_t isqrt_below(int64_t x) {
  int64_t t = static_cast<int64_t>(std::sqrt(static_cast<double>(x - 1)));
  while (t > 0 && t * t >= x) --t;
  while ((t + 1) * (t + 1) < x) ++t;
  return t;
}

// Allowed columns [begin, end) of one score row.
using ColumnRange = std::pair<int64_t, int64_t>;

// ---------------------------------------------------------------------------------------------
// Enumeration helpers: window keys of a query, grid rows as memory runs, block shapes.

// Key window of one grid query: per-axis inclusive ranges (a box, or a circle's bounding box) and
// the circle's centre.
struct QueryWindow {
  std::array<int64_t, 3> lo, hi, ctr;
};

inline QueryWindow query_window(const WindowGeometry& geo, Coord3 c) {
  const int64_t p[3] = {c.x0, c.x1, c.x2};
  QueryWindow w;
  for (int a = 0; a < 3; ++a) geo.axis_range(a, p[a], w.lo[a], w.hi[a], w.ctr[a]);
  return w;
}

// Half-width of a circle's row at squared distance q = d0^2 + d1^2 < r^2 from the centre: the
// largest t with q + t^2 < r^2. Tabulated for q below min(r^2, kTable) (one square root per
// (query, grid row) is a visible cost otherwise).
class CircleRows {
 public:
  explicit CircleRows(const WindowGeometry& geo) : r2_(geo.radius * geo.radius) {
    if (!geo.circle) return;
    table_.resize(std::min(r2_, kTable));
    for (int64_t q = 0; q < static_cast<int64_t>(table_.size()); ++q) table_[q] = isqrt_below(r2_ - q);
  }
  int64_t half_width(int64_t q) const {
    return q < static_cast<int64_t>(table_.size()) ? table_[q] : isqrt_below(r2_ - q);
  }
  int64_t r2() const { return r2_; }

 private:
  static constexpr int64_t kTable = int64_t(1) << 16;
  int64_t r2_;
  std::vector<int64_t> table_;
};

// The keys of window w on grid row (x0, x1) are x2 in [a2, b2]; false when the row holds none.
inline bool row_keys(const WindowGeometry& geo, const CircleRows& circle, const QueryWindow& w, int64_t x0,
                     int64_t x1, int64_t& a2, int64_t& b2) {
  // Checked first also for circles: it bounds |d0|, |d1| by the radius, so the squares fit int64.
  if (x0 < w.lo[0] || x0 > w.hi[0] || x1 < w.lo[1] || x1 > w.hi[1]) return false;
  a2 = w.lo[2];
  b2 = w.hi[2];
  if (geo.circle) {
    const int64_t d0 = x0 - w.ctr[0], d1 = x1 - w.ctr[1];
    const int64_t q = d0 * d0 + d1 * d1;
    if (q >= circle.r2()) return false;
    const int64_t t = circle.half_width(q);
    a2 = std::max(a2, w.ctr[2] - t);
    b2 = std::min(b2, w.ctr[2] + t);
  }
  return a2 <= b2;
}

// Calls f(token, count) for the memory-contiguous pieces of grid row (x0, x1), x2 in [a2, b2]
// (token: index among the grid tokens); tile order breaks a row at the tile boundaries of axis 2.
template <typename F>
inline void for_each_token_run(const WindowGeometry& geo, int64_t x0, int64_t x1, int64_t a2, int64_t b2, F&& f) {
  if (!geo.tiled) {
    f(geo.layout.row_major_index({x0, x1, a2}), b2 - a2 + 1);
    return;
  }
  const int64_t u2 = geo.layout.u2;
  for (int64_t x2 = a2; x2 <= b2;) {
    const int64_t end = std::min(b2, (x2 / u2 + 1) * u2 - 1);
    f(geo.layout.index({x0, x1, x2}), end - x2 + 1);
    x2 = end + 1;
  }
}

// Query box of the grid blocks. A block scores the bounding box of its queries' windows (per axis
// about window + box - 1 keys for each query), so small boxes waste less; but each key of that box
// is also gathered once per block, whatever its number of GEMM rows, and each block has a fixed
// cost (GEMM calls). The box minimises the model, in scored (row, key) pairs,
//   sum over blocks of  keys(block) * (rows(block) + kGatherRows) + kBlockCost,
// computed exactly (borders and partial blocks included): the sums factor into per-axis sums.
inline std::array<int64_t, 3> choose_block(const WindowGeometry& geo, int64_t group) {
  constexpr double kGatherRows = 8, kBlockCost = 1000;  // measured
  // Per axis and box size b: number of blocks, sums over the blocks of keys and of keys * queries.
  std::array<std::vector<double>, 3> blocks, keys, keys_queries;
  for (int a = 0; a < 3; ++a) {
    const int64_t n = geo.grid[a], bmax = std::min(n, kMaxBlock);
    blocks[a].assign(bmax + 1, 0);
    keys[a].assign(bmax + 1, 0);
    keys_queries[a].assign(bmax + 1, 0);
    for (int64_t b = 1; b <= bmax; ++b) {
      blocks[a][b] = static_cast<double>(ceil_div(n, b));
      for (int64_t p0 = 0; p0 < n; p0 += b) {
        const int64_t p1 = std::min(n, p0 + b) - 1;
        int64_t lo, hi, lo1, hi1, c;
        geo.axis_range(a, p0, lo, hi, c);  // ranges are monotone in the query coordinate
        geo.axis_range(a, p1, lo1, hi1, c);
        keys[a][b] += static_cast<double>(hi1 - lo + 1);
        keys_queries[a][b] += static_cast<double>((hi1 - lo + 1) * (p1 - p0 + 1));
      }
    }
  }
  std::array<int64_t, 3> best{1, 1, 1};
  double best_cost = std::numeric_limits<double>::infinity();
  for (int64_t b0 = 1; b0 < static_cast<int64_t>(keys[0].size()); ++b0) {
    for (int64_t b1 = 1; b1 < static_cast<int64_t>(keys[1].size()) && b0 * b1 <= kMaxBlock; ++b1) {
      for (int64_t b2 = 1; b2 < static_cast<int64_t>(keys[2].size()) && b0 * b1 * b2 <= kMaxBlock; ++b2) {
        const double scored =
            static_cast<double>(group) * keys_queries[0][b0] * keys_queries[1][b1] * keys_queries[2][b2];
        const double cost = scored + kGatherRows * keys[0][b0] * keys[1][b1] * keys[2][b2] +
                            kBlockCost * blocks[0][b0] * blocks[1][b1] * blocks[2][b2];
        if (cost < best_cost) best_cost = cost, best = {b0, b1, b2};
      }
    }
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// The block walker: a block's queries and the chunks of its keys, shared by the forward and the
// backward kernels.

// One call's input tensors, read in place through their strides.
template <typename scalar_t>
struct Problem {
  const WindowGeometry* geo;
  const CircleRows* circle;
  const scalar_t *q, *k, *v, *ek, *ev;
  std::array<int64_t, 3> qs, ks, vs, eks, evs;  // strides of dims B, S, H
  int64_t B, S, H, D, Hkv, group, E, P;
  double scale;
};

inline std::array<int64_t, 3> strides3(const at::Tensor* t) {
  return t ? std::array<int64_t, 3>{t->stride(0), t->stride(1), t->stride(2)} : std::array<int64_t, 3>{};
}

template <typename scalar_t>
Problem<scalar_t> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* ek,
                               const at::Tensor* ev, const WindowGeometry& geo, const CircleRows& circle,
                               double scale) {
  return {&geo,
          &circle,
          q.const_data_ptr<scalar_t>(),
          k.const_data_ptr<scalar_t>(),
          v.const_data_ptr<scalar_t>(),
          ek ? ek->const_data_ptr<scalar_t>() : nullptr,
          ev ? ev->const_data_ptr<scalar_t>() : nullptr,
          strides3(&q),
          strides3(&k),
          strides3(&v),
          strides3(ek),
          strides3(ev),
          q.size(0),
          q.size(1),
          q.size(2),
          q.size(3),
          k.size(2),
          q.size(2) / k.size(2),
          ek ? ek->size(1) : 0,
          geo.num_prefix,
          scale};
}

// Sets up one block (prefix_block / grid_block), then for_each_chunk gathers its keys chunk by
// chunk into opmath K and V tiles and calls a kernel's step; during the step, columns(i) lists the
// allowed tile rows of query i and key_index(j) says where tile row j came from.
template <typename scalar_t>
class BlockWalker {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  explicit BlockWalker(const Problem<scalar_t>& pb)
      : pb_(pb), geo_(*pb.geo), circle_(*pb.circle), D_(pb.D), seq_(kMaxBlock), win_(kMaxBlock),
        k_(kKeyChunk * D_), v_(kKeyChunk * D_), key_(kKeyChunk) {
    rows_in_chunk_.reserve(kKeyChunk);
  }

  // Prefix queries [s0, s1): every sequence key, no mask.
  void prefix_block(int64_t b, int64_t hk, int64_t s0, int64_t s1) {
    b_ = b, hk_ = hk, nq_ = s1 - s0;
    for (int64_t i = 0; i < nq_; ++i) seq_[i] = s0 + i;
    segs_[0] = sequence_keys(0, pb_.S, false);
    nsegs_ = 1;
  }

  // Grid queries with coordinates in the box [lo, hi]: prefix keys, their windows, extra keys.
  void grid_block(int64_t b, int64_t hk, const std::array<int64_t, 3>& lo, const std::array<int64_t, 3>& hi) {
    b_ = b, hk_ = hk, nq_ = 0;
    for (int64_t x0 = lo[0]; x0 <= hi[0]; ++x0) {
      for (int64_t x1 = lo[1]; x1 <= hi[1]; ++x1) {
        int64_t x2 = lo[2];
        for_each_token_run(geo_, x0, x1, lo[2], hi[2], [&](int64_t tok, int64_t count) {
          for (int64_t t = tok; t < tok + count; ++t, ++x2, ++nq_) {
            seq_[nq_] = pb_.P + t;
            win_[nq_] = query_window(geo_, {x0, x1, x2});
          }
        });
      }
    }
    // The bounding box of the windows; its keys are listed in row-major order of their coordinates.
    for (int a = 0; a < 3; ++a) {
      ulo_[a] = win_[0].lo[a];
      int64_t uhi = win_[0].hi[a];
      for (int64_t i = 1; i < nq_; ++i) {
        ulo_[a] = std::min(ulo_[a], win_[i].lo[a]);
        uhi = std::max(uhi, win_[i].hi[a]);
      }
      un_[a] = uhi - ulo_[a] + 1;
    }
    segs_[0] = sequence_keys(0, pb_.P, false);
    segs_[1] = sequence_keys(pb_.P, un_[0] * un_[1] * un_[2], true);
    segs_[2] = {pb_.ek + b * pb_.eks[0] + hk * pb_.eks[2], pb_.ev + b * pb_.evs[0] + hk * pb_.evs[2], pb_.eks[1],
                pb_.evs[1], pb_.E, pb_.S, false};
    nsegs_ = 3;
  }

  // Walks the block's keys (the concatenated segments) in even chunks of at most kKeyChunk keys,
  // calling step(n) with the n keys of each chunk in the K/V tiles: a chunk may hold parts of
  // several segments (small prefix and extra key sets then share the GEMMs of the window keys),
  // and a grid row of the window box may straddle two chunks.
  template <typename Step>
  void for_each_chunk(Step&& step) {
    int64_t total = 0;
    for (int s = 0; s < nsegs_; ++s) total += segs_[s].count;
    const int64_t chunk = ceil_div(total, ceil_div(total, kKeyChunk));
    for (int64_t j0 = 0; j0 < total; j0 += chunk) {
      n_ = std::min(chunk, total - j0);
      dense_cols_.clear();
      rows_in_chunk_.clear();
      int64_t start = 0;  // of the segment in the block's key list
      for (int s = 0; s < nsegs_; ++s) {
        const Segment& sg = segs_[s];
        const int64_t a = std::max(j0, start), e = std::min(j0 + n_, start + sg.count);
        if (a < e && !sg.window) {
          load(sg, a - start, e - a, a - j0);
          dense_cols_.emplace_back(a - j0, e - j0);
        } else if (a < e) {
          // Box keys [a, e) - start: whole grid rows (x0, x1) of un_[2] keys, clipped to the chunk.
          const int64_t n1 = un_[1], n2 = un_[2];
          for (int64_t row = (a - start) / n2; row * n2 < e - start; ++row) {
            const int64_t base = start + row * n2 - j0;
            const ChunkRow cr{ulo_[0] + row / n1, ulo_[1] + row % n1, base, std::max<int64_t>(0, -base),
                              std::min(n2, n_ - base)};
            int64_t col = cr.base + cr.c0;
            for_each_token_run(geo_, cr.x0, cr.x1, ulo_[2] + cr.c0, ulo_[2] + cr.c1 - 1,
                               [&](int64_t tok, int64_t count) {
                                 load(sg, tok, count, col);
                                 col += count;
                               });
            rows_in_chunk_.push_back(cr);
          }
        }
        start += sg.count;
      }
      step(n_);
    }
  }

  // The allowed keys (tile rows, i.e. score columns) of query i in the current chunk, as
  // increasing half-open ranges; they serve every q head of the group.
  const std::vector<ColumnRange>& columns(int64_t i) {
    runs_.clear();
    // Columns in increasing order: dense parts before the box (prefix keys), the box, after it.
    size_t d = 0;
    const int64_t box = rows_in_chunk_.empty() ? n_ : rows_in_chunk_[0].base + rows_in_chunk_[0].c0;
    for (; d < dense_cols_.size() && dense_cols_[d].first < box; ++d) runs_.push_back(dense_cols_[d]);
    for (const ChunkRow& cr : rows_in_chunk_) {
      int64_t a2, b2;
      if (!row_keys(geo_, circle_, win_[i], cr.x0, cr.x1, a2, b2)) continue;
      const int64_t a = std::max(a2 - ulo_[2], cr.c0), e = std::min(b2 - ulo_[2] + 1, cr.c1);
      if (a < e) runs_.emplace_back(cr.base + a, cr.base + e);
    }
    for (; d < dense_cols_.size(); ++d) runs_.push_back(dense_cols_[d]);
    return runs_;
  }

  int64_t batch() const { return b_; }
  int64_t kv_head() const { return hk_; }
  int64_t num_queries() const { return nq_; }
  int64_t seq(int64_t i) const { return seq_[i]; }  // sequence index of query i
  const acc_t* k_tile() const { return k_.data(); }
  const acc_t* v_tile() const { return v_.data(); }
  // Key index of tile row j: its sequence position, or S + e for extra key e.
  int64_t key_index(int64_t j) const { return key_[j]; }

 private:
  // A run of a block's keys, from a (B, L, Hkv, D) tensor. Dense: count keys contiguous from k, v,
  // seen by every query of the block. Window: the bounding box of the block's windows (ulo_, un_),
  // grid tokens indexed from k, v; each query masked to its own window.
  struct Segment {
    const scalar_t *k, *v;  // the first key and value (batch and kv head applied)
    int64_t ks, vs;         // row strides
    int64_t count;
    int64_t index;          // key index of row 0 of k (rows are numbered from there, grid tokens too)
    bool window;
  };

  // Keys of k and v from sequence position first.
  Segment sequence_keys(int64_t first, int64_t count, bool window) const {
    return {pb_.k + b_ * pb_.ks[0] + first * pb_.ks[1] + hk_ * pb_.ks[2],
            pb_.v + b_ * pb_.vs[0] + first * pb_.vs[1] + hk_ * pb_.vs[2],
            pb_.ks[1],
            pb_.vs[1],
            count,
            first,
            window};
  }

  // A grid row (x0, x1) of the window box in a chunk.
  struct ChunkRow {
    int64_t x0, x1;
    int64_t base;    // tile row of the key x2 = ulo_[2] (negative when the row starts before the chunk)
    int64_t c0, c1;  // the keys x2 - ulo_[2] in [c0, c1) lie in the chunk, at tile rows base + x2 - ulo_[2]
  };

  // Copies rows [first, first + count) of a segment into the K and V tiles from tile row col.
  void load(const Segment& sg, int64_t first, int64_t count, int64_t col) {
    gather(sg.k + first * sg.ks, sg.ks, count, k_.data() + col * D_);
    gather(sg.v + first * sg.vs, sg.vs, count, v_.data() + col * D_);
    for (int64_t t = 0; t < count; ++t) key_[col + t] = sg.index + first + t;
  }

  void gather(const scalar_t* src, int64_t rs, int64_t count, acc_t* dst) const {
    for (int64_t t = 0; t < count; ++t) {
      const scalar_t* s = src + t * rs;
      acc_t* d = dst + t * D_;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        std::memcpy(d, s, D_ * sizeof(acc_t));
      } else {
        for (int64_t e = 0; e < D_; ++e) d[e] = static_cast<acc_t>(s[e]);
      }
    }
  }

  const Problem<scalar_t>& pb_;
  const WindowGeometry& geo_;
  const CircleRows& circle_;
  const int64_t D_;
  int64_t b_ = 0, hk_ = 0, nq_ = 0, n_ = 0;
  std::vector<int64_t> seq_;             // sequence index of each block query
  std::vector<QueryWindow> win_;         // window of each block query (grid blocks)
  std::array<int64_t, 3> ulo_{}, un_{};  // bounding box of the windows: first coordinates, sizes
  std::array<Segment, 3> segs_{};
  int nsegs_ = 0;
  std::vector<acc_t> k_, v_;                    // the chunk's keys and values
  std::vector<int64_t> key_;                    // key index of each tile row
  std::vector<ColumnRange> runs_, dense_cols_;  // a query's allowed columns; the chunk's dense columns
  std::vector<ChunkRow> rows_in_chunk_;         // the chunk's box rows
};

// Turns a score row s (n columns) into s - m on the allowed columns, -inf elsewhere (everywhere
// when m = -inf), ready for the exp.
template <typename T>
inline void shift_columns(T* s, int64_t n, const std::vector<ColumnRange>& runs, T m) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  int64_t done = 0;
  if (m != kNegInf) {
    for (const auto& [a, e] : runs) {
      std::fill(s + done, s + a, kNegInf);
      for (int64_t j = a; j < e; ++j) s[j] -= m;
      done = e;
    }
  }
  std::fill(s + done, s + n, kNegInf);
}

// The blocks of one (batch, kv head): prefix runs of kMaxBlock queries first, then the grid boxes.
struct BlockPlan {
  std::array<int64_t, 3> blk, nblk;
  int64_t P, n_prefix, n_grid;

  BlockPlan(const WindowGeometry& geo, int64_t group)
      : blk(choose_block(geo, group)), P(geo.num_prefix), n_prefix(ceil_div(geo.num_prefix, kMaxBlock)) {
    for (int a = 0; a < 3; ++a) nblk[a] = ceil_div(geo.grid[a], blk[a]);
    n_grid = nblk[0] * nblk[1] * nblk[2];
  }
  int64_t count() const { return n_prefix + n_grid; }

  // Sets up block t of (b, hk) in the walker.
  template <typename scalar_t>
  void setup(BlockWalker<scalar_t>& w, const WindowGeometry& geo, int64_t b, int64_t hk, int64_t t) const {
    if (t < n_prefix) {
      w.prefix_block(b, hk, t * kMaxBlock, std::min(P, (t + 1) * kMaxBlock));
      return;
    }
    t -= n_prefix;
    const int64_t t2 = t % nblk[2], t1 = t / nblk[2] % nblk[1], t0 = t / (nblk[1] * nblk[2]);
    const std::array<int64_t, 3> lo{t0 * blk[0], t1 * blk[1], t2 * blk[2]};
    std::array<int64_t, 3> hi;
    for (int a = 0; a < 3; ++a) hi[a] = std::min(geo.grid[a], lo[a] + blk[a]) - 1;
    w.grid_block(b, hk, lo, hi);
  }
};

}  // namespace window_cpu
}  // namespace dtk
