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
namespace {

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
std::array<int64_t, 3> choose_block(const WindowGeometry& geo, int64_t group) {
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
void shift_columns(T* s, int64_t n, const std::vector<ColumnRange>& runs, T m) {
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

// ---------------------------------------------------------------------------------------------
// Forward: online softmax over the chunks. Row r = g * nq + i of the tiles is query i of the block
// for q head g of the GQA group.

template <typename scalar_t>
class ForwardKernel {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

 public:
  // out (B, S, H, D) and lse (B, H, S), contiguous.
  ForwardKernel(const Problem<scalar_t>& pb, scalar_t* out, float* lse)
      : pb_(pb), walk_(pb), D_(pb.D), out_(out), lse_(lse),
        opts_(at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value)), q_(pb.group * kMaxBlock * D_),
        acc_(q_.size()), m_(pb.group * kMaxBlock), l_(m_.size()), sum_(m_.size()),
        s_(pb.group * kMaxBlock * kKeyChunk) {}

  BlockWalker<scalar_t>& walker() { return walk_; }

  // Attends the block set up in the walker.
  void run() {
    begin();
    walk_.for_each_chunk([this](int64_t n) { step(n); });
    finish();
  }

 private:
  // Loads the block's queries (times the softmax scale) and resets the softmax state.
  void begin() {
    nq_ = walk_.num_queries();
    rows_ = pb_.group * nq_;
    const acc_t scale = static_cast<acc_t>(pb_.scale);
    for (int64_t g = 0; g < pb_.group; ++g) {
      const scalar_t* qh = pb_.q + walk_.batch() * pb_.qs[0] + (walk_.kv_head() * pb_.group + g) * pb_.qs[2];
      for (int64_t i = 0; i < nq_; ++i) {
        const scalar_t* src = qh + walk_.seq(i) * pb_.qs[1];
        acc_t* dst = q_.data() + (g * nq_ + i) * D_;
        for (int64_t d = 0; d < D_; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
      }
    }
    std::fill_n(acc_.begin(), rows_ * D_, acc_t(0));
    std::fill_n(m_.begin(), rows_, kNegInf);
    std::fill_n(l_.begin(), rows_, acc_t(0));
  }

  // Writes out = acc / l and lse = m + log(l); rows that saw no key get 0 and -inf.
  void finish() {
    const int64_t b = walk_.batch();
    for (int64_t g = 0; g < pb_.group; ++g) {
      const int64_t h = walk_.kv_head() * pb_.group + g;
      for (int64_t i = 0; i < nq_; ++i) {
        const int64_t r = g * nq_ + i, s = walk_.seq(i);
        const acc_t* a = acc_.data() + r * D_;
        const acc_t l = l_[r];
        scalar_t* o = out_ + ((b * pb_.S + s) * pb_.H + h) * D_;
        float* lse = lse_ + (b * pb_.H + h) * pb_.S + s;
        if (l > acc_t(0)) {
          const acc_t inv = acc_t(1) / l;
          for (int64_t d = 0; d < D_; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
          *lse = static_cast<float>(m_[r] + std::log(l));
        } else {
          std::fill_n(o, D_, scalar_t(0));
          *lse = -std::numeric_limits<float>::infinity();
        }
      }
    }
  }

  // Folds the n keys of the K/V tiles into the block's softmax state.
  void step(int64_t n) {
    at::Tensor s = at::from_blob(s_.data(), {rows_, n}, opts_);
    at::cpu::mm_out(s, tile(q_.data(), rows_), tile(walk_.k_tile(), n).t());
    for (int64_t i = 0; i < nq_; ++i) {
      const std::vector<ColumnRange>& runs = walk_.columns(i);
      for (int64_t g = 0; g < pb_.group; ++g) shift_row(g * nq_ + i, n, runs);
    }
    // One exp over the whole tile with ATen's vectorised kernel (runtime ISA dispatch): masked
    // columns hold -inf and become 0. Then the row sums, and acc += P V.
    at::cpu::exp_out(s, s);
    at::Tensor sums = at::from_blob(sum_.data(), {rows_}, opts_);
    at::cpu::sum_out(sums, s, at::IntArrayRef{1});
    for (int64_t r = 0; r < rows_; ++r) l_[r] += sum_[r];
    at::Tensor acc = tile(acc_.data(), rows_);
    at::cpu::addmm_(acc, s, tile(walk_.v_tile(), n));
  }

  // Online-softmax step of row r over the allowed columns: updates the running max (rescaling acc
  // and l) and turns the scores into score - max on the allowed columns, -inf elsewhere.
  void shift_row(int64_t r, int64_t n, const std::vector<ColumnRange>& runs) {
    acc_t* s = s_.data() + r * n;
    acc_t cmax = kNegInf;
    for (const auto& [a, e] : runs) cmax = std::max(cmax, max_of(s + a, e - a));
    const acc_t m_old = m_[r];
    if (cmax > m_old) {
      if (m_old != kNegInf) {  // acc and l are still 0 while the max is -inf
        const acc_t alpha = std::exp(m_old - cmax);
        acc_t* a = acc_.data() + r * D_;
        for (int64_t d = 0; d < D_; ++d) a[d] *= alpha;
        l_[r] *= alpha;
      }
      m_[r] = cmax;
    }
    shift_columns(s, n, runs, m_[r]);  // (no key so far: the whole row stays -inf)
  }

  // Max over independent lanes: no serial dependency on one accumulator.
  static acc_t max_of(const acc_t* x, int64_t n) {
    acc_t m[4] = {kNegInf, kNegInf, kNegInf, kNegInf};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      for (int u = 0; u < 4; ++u) m[u] = std::max(m[u], x[j + u]);
    }
    for (; j < n; ++j) m[0] = std::max(m[0], x[j]);
    return std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  }

  // A (rows, D) opmath tile as a tensor (no copy).
  at::Tensor tile(const acc_t* data, int64_t rows) const {
    return at::from_blob(const_cast<acc_t*>(data), {rows, D_}, opts_);
  }

  const Problem<scalar_t>& pb_;
  BlockWalker<scalar_t> walk_;
  const int64_t D_;
  scalar_t* out_;
  float* lse_;
  const at::TensorOptions opts_;
  int64_t nq_ = 0, rows_ = 0;
  std::vector<acc_t> q_, acc_, m_, l_, sum_, s_;  // tiles; per row: running max m, sum l, chunk sum
};

template <typename scalar_t>
void run_forward(const Problem<scalar_t>& pb, scalar_t* out, float* lse) {
  const WindowGeometry& geo = *pb.geo;
  const BlockPlan plan(geo, pb.group);
  const int64_t per_head = pb.B * pb.Hkv;
  const int64_t total = per_head * plan.count();

  // Items (batch, kv head, block) are handed out dynamically, prefix blocks (S keys each) first:
  // costs differ a lot between items and the cores may be shared.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), total);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    ForwardKernel<scalar_t> kernel(pb, out, lse);
    for (int64_t item = next++; item < total; item = next++) {
      const bool prefix = item < per_head * plan.n_prefix;
      const int64_t j = prefix ? item : item - per_head * plan.n_prefix;
      const int64_t n = prefix ? plan.n_prefix : plan.n_grid;
      const int64_t b = j / (pb.Hkv * n), hk = j / n % pb.Hkv, t = j % n;
      plan.setup(kernel.walker(), geo, b, hk, prefix ? t : plan.n_prefix + t);
      kernel.run();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward. Per block and chunk, with P recomputed from the lse:
//   S = (scale Q) K^T,  P = exp(S - lse) on the allowed columns,  dP = dO V^T,  dS = P * (dP - delta),
//   dQ += dS K (times scale at the end),  dK[keys] += dS^T (scale Q),  dV[keys] += P^T dO.
// dK and dV rows are scattered through the walker's key indices into opmath buffers of the whole
// (batch, kv head), which is why a work item is a (batch, kv head) and its blocks run in order.

// The backward's own tensors.
template <typename scalar_t>
struct GradProblem {
  const scalar_t *dout, *out;
  std::array<int64_t, 3> dos, os;      // strides of dims B, S, H
  const float *lse, *dlse;             // dlse: null without grad_lse
  std::array<int64_t, 3> lses, dlses;  // strides of dims B, H, S
  scalar_t *dq, *dk, *dv, *dek, *dev;  // contiguous outputs
};

template <typename scalar_t>
class BackwardKernel {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // The lse is float32, which would cap float64 gradients at float32 accuracy: for float64 a first
  // walk over the keys refines it, lse += log(sum_j exp(s_j - lse)), so that P sums to 1 in float64.
  static constexpr bool kRefineLse = std::is_same_v<scalar_t, double>;

 public:
  BackwardKernel(const Problem<scalar_t>& pb, const GradProblem<scalar_t>& gp)
      : pb_(pb), gp_(gp), walk_(pb), D_(pb.D), opts_(at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value)),
        q_(pb.group * kMaxBlock * D_), do_(q_.size()), acc_(q_.size()), lse_(pb.group * kMaxBlock),
        delta_(lse_.size()), sum_(lse_.size()), l_(lse_.size()), s_(pb.group * kMaxBlock * kKeyChunk),
        ds_(s_.size()), dk_tile_(kKeyChunk * D_), dv_tile_(kKeyChunk * D_), dk_((pb.S + pb.E) * D_),
        dv_(dk_.size()) {}

  BlockWalker<scalar_t>& walker() { return walk_; }

  // Starts the gradients of keys and values of one (batch, kv head).
  void begin_head() {
    std::fill(dk_.begin(), dk_.end(), acc_t(0));
    std::fill(dv_.begin(), dv_.end(), acc_t(0));
  }

  // Backward of the block set up in the walker: writes its dq rows, accumulates dk and dv.
  void run() {
    begin();
    if constexpr (kRefineLse) {
      summing_ = true;
      std::fill_n(l_.begin(), rows_, acc_t(0));
      walk_.for_each_chunk([this](int64_t n) { step(n); });
      summing_ = false;
      for (int64_t r = 0; r < rows_; ++r) lse_[r] += std::log(l_[r]);  // no key: -inf, stays so
    }
    walk_.for_each_chunk([this](int64_t n) { step(n); });
    finish();
  }

  // Writes dk and dv (and the extra keys' gradients) of (b, hk) in the output dtype.
  void end_head(int64_t b, int64_t hk) {
    const auto write = [&](const acc_t* src, scalar_t* dst, int64_t L) {
      for (int64_t t = 0; t < L; ++t) {
        scalar_t* d = dst + ((b * L + t) * pb_.Hkv + hk) * D_;
        for (int64_t e = 0; e < D_; ++e) d[e] = static_cast<scalar_t>(src[t * D_ + e]);
      }
    };
    write(dk_.data(), gp_.dk, pb_.S);
    write(dv_.data(), gp_.dv, pb_.S);
    write(dk_.data() + pb_.S * D_, gp_.dek, pb_.E);
    write(dv_.data() + pb_.S * D_, gp_.dev, pb_.E);
  }

 private:
  // Loads the block's queries (times the scale), grad_out rows, lse and delta = dO . out - grad_lse.
  // Rows without keys (lse = -inf) get dO = 0 and delta = 0: they contribute nothing.
  void begin() {
    nq_ = walk_.num_queries();
    rows_ = pb_.group * nq_;
    const int64_t b = walk_.batch();
    const acc_t scale = static_cast<acc_t>(pb_.scale);
    for (int64_t g = 0; g < pb_.group; ++g) {
      const int64_t h = walk_.kv_head() * pb_.group + g;
      for (int64_t i = 0; i < nq_; ++i) {
        const int64_t r = g * nq_ + i, s = walk_.seq(i);
        const scalar_t* q = pb_.q + b * pb_.qs[0] + s * pb_.qs[1] + h * pb_.qs[2];
        const scalar_t* dout = gp_.dout + b * gp_.dos[0] + s * gp_.dos[1] + h * gp_.dos[2];
        const scalar_t* out = gp_.out + b * gp_.os[0] + s * gp_.os[1] + h * gp_.os[2];
        acc_t *qr = q_.data() + r * D_, *dor = do_.data() + r * D_;
        for (int64_t d = 0; d < D_; ++d) qr[d] = static_cast<acc_t>(q[d]) * scale;
        lse_[r] = static_cast<acc_t>(gp_.lse[b * gp_.lses[0] + h * gp_.lses[1] + s * gp_.lses[2]]);
        if (lse_[r] == kNegInf) {
          std::fill_n(dor, D_, acc_t(0));
          delta_[r] = 0;
          continue;
        }
        acc_t delta = 0;
        for (int64_t d = 0; d < D_; ++d) {
          dor[d] = static_cast<acc_t>(dout[d]);
          delta += dor[d] * static_cast<acc_t>(out[d]);
        }
        if (gp_.dlse) delta -= static_cast<acc_t>(gp_.dlse[b * gp_.dlses[0] + h * gp_.dlses[1] + s * gp_.dlses[2]]);
        delta_[r] = delta;
      }
    }
    std::fill_n(acc_.begin(), rows_ * D_, acc_t(0));
  }

  // Writes dq = scale * (dS K summed over the chunks).
  void finish() {
    const int64_t b = walk_.batch();
    const acc_t scale = static_cast<acc_t>(pb_.scale);
    for (int64_t g = 0; g < pb_.group; ++g) {
      const int64_t h = walk_.kv_head() * pb_.group + g;
      for (int64_t i = 0; i < nq_; ++i) {
        const acc_t* a = acc_.data() + (g * nq_ + i) * D_;
        scalar_t* dq = gp_.dq + ((b * pb_.S + walk_.seq(i)) * pb_.H + h) * D_;
        for (int64_t d = 0; d < D_; ++d) dq[d] = static_cast<scalar_t>(a[d] * scale);
      }
    }
  }

  void step(int64_t n) {
    at::Tensor q = tile(q_.data(), rows_), dout = tile(do_.data(), rows_);
    at::Tensor k = tile(walk_.k_tile(), n), v = tile(walk_.v_tile(), n);
    at::Tensor p = at::from_blob(s_.data(), {rows_, n}, opts_);
    at::cpu::mm_out(p, q, k.t());
    for (int64_t i = 0; i < nq_; ++i) {
      const std::vector<ColumnRange>& runs = walk_.columns(i);
      for (int64_t g = 0; g < pb_.group; ++g) {
        const int64_t r = g * nq_ + i;
        shift_columns(s_.data() + r * n, n, runs, lse_[r]);
      }
    }
    at::cpu::exp_out(p, p);  // masked columns: exp(-inf) = 0
    if (summing_) {
      at::Tensor sums = at::from_blob(sum_.data(), {rows_}, opts_);
      at::cpu::sum_out(sums, p, at::IntArrayRef{1});
      for (int64_t r = 0; r < rows_; ++r) l_[r] += sum_[r];
      return;
    }
    at::Tensor ds = at::from_blob(ds_.data(), {rows_, n}, opts_);
    at::cpu::mm_out(ds, dout, v.t());  // dP
    for (int64_t r = 0; r < rows_; ++r) {
      const acc_t* pr = s_.data() + r * n;
      acc_t* dr = ds_.data() + r * n;
      const acc_t delta = delta_[r];
      for (int64_t j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - delta);
    }
    at::Tensor acc = tile(acc_.data(), rows_);
    at::cpu::addmm_(acc, ds, k);
    at::Tensor dk = tile(dk_tile_.data(), n), dv = tile(dv_tile_.data(), n);
    at::cpu::mm_out(dk, ds.t(), q);
    at::cpu::mm_out(dv, p.t(), dout);
    // The chunk's keys are distinct: one add per tile row.
    for (int64_t j = 0; j < n; ++j) {
      const int64_t key = walk_.key_index(j);
      acc_t *dkr = dk_.data() + key * D_, *dvr = dv_.data() + key * D_;
      const acc_t *ck = dk_tile_.data() + j * D_, *cv = dv_tile_.data() + j * D_;
      for (int64_t d = 0; d < D_; ++d) dkr[d] += ck[d], dvr[d] += cv[d];
    }
  }

  at::Tensor tile(const acc_t* data, int64_t rows) const {
    return at::from_blob(const_cast<acc_t*>(data), {rows, D_}, opts_);
  }

  const Problem<scalar_t>& pb_;
  const GradProblem<scalar_t>& gp_;
  BlockWalker<scalar_t> walk_;
  const int64_t D_;
  const at::TensorOptions opts_;
  int64_t nq_ = 0, rows_ = 0;
  bool summing_ = false;  // the lse-refining walk (float64)
  std::vector<acc_t> q_, do_, acc_;    // (rows, D): scale * q, grad_out, dq / scale
  std::vector<acc_t> lse_, delta_, sum_, l_;  // per row
  std::vector<acc_t> s_, ds_;          // (rows, chunk): P, dP then dS
  std::vector<acc_t> dk_tile_, dv_tile_;  // (chunk, D): the chunk's gradient rows
  std::vector<acc_t> dk_, dv_;         // (S + E, D): gradients of this (batch, kv head)'s keys, values
};

template <typename scalar_t>
void run_backward(const Problem<scalar_t>& pb, const GradProblem<scalar_t>& gp) {
  const WindowGeometry& geo = *pb.geo;
  const BlockPlan plan(geo, pb.group);
  const int64_t heads = pb.B * pb.Hkv;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), heads);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    BackwardKernel<scalar_t> kernel(pb, gp);
    for (int64_t item = next++; item < heads; item = next++) {
      const int64_t b = item / pb.Hkv, hk = item % pb.Hkv;
      kernel.begin_head();
      for (int64_t t = 0; t < plan.count(); ++t) {
        plan.setup(kernel.walker(), geo, b, hk, t);
        kernel.run();
      }
      kernel.end_head(b, hk);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Ops.

std::tuple<at::Tensor, at::Tensor> window_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::IntArrayRef grid,
    at::OptionalIntArrayRef window, std::optional<int64_t> radius, c10::string_view border, int64_t num_prefix,
    at::OptionalIntArrayRef tile, std::optional<double> scale, const std::optional<at::Tensor>& extra_k,
    const std::optional<at::Tensor>& extra_v) {
  check_qkv(q, k, v, extra_k, extra_v, /*allow_double=*/true, /*same_seq=*/true);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  const WindowGeometry geo = parse_window_geometry(grid, window, radius, std::string(border), num_prefix, tile,
                                                   q.size(1), "S (q.shape[1])");
  const double sc = check_scale(scale, q.size(3));
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  at::Tensor out = new_output({B, S, H, D}, q.options());
  at::Tensor lse = new_output({B, H, S}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor* ek = extra_k.has_value() ? &*extra_k : nullptr;
  const at::Tensor* ev = extra_v.has_value() ? &*extra_v : nullptr;
  const CircleRows circle(geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dtk::window_attention (CPU)", [&] {
    run_forward<scalar_t>(make_problem<scalar_t>(q, k, v, ek, ev, geo, circle, sc), out.mutable_data_ptr<scalar_t>(),
                          lse.mutable_data_ptr<float>());
  });
  return {out, lse};
}

// A (B, H, S) float32 tensor on q's device (any strides).
void check_lse_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), name, " must be on the same device as q (", q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(2) && t.size(2) == q.size(1), name,
                    " must be (batch, heads, seq) = (", q.size(0), ", ", q.size(2), ", ", q.size(1), "), got ",
                    t.sizes());
}

// Like q (B, S, H, D): same shape, dtype and device, contiguous last dim.
void check_q_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_bshd(t, name);
  check_same_dtype_device(t, name, q, "q");
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::IntArrayRef grid,
    at::OptionalIntArrayRef window, std::optional<int64_t> radius, c10::string_view border, int64_t num_prefix,
    at::OptionalIntArrayRef tile, std::optional<double> scale, const std::optional<at::Tensor>& extra_k,
    const std::optional<at::Tensor>& extra_v) {
  check_qkv(q, k, v, extra_k, extra_v, /*allow_double=*/true, /*same_seq=*/true);
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel, got ", q.device());
  check_q_like(grad_out, "grad_out", q);
  check_q_like(out, "out", q);
  check_lse_like(lse, "lse", q);
  if (grad_lse.has_value()) check_lse_like(*grad_lse, "grad_lse", q);
  const WindowGeometry geo = parse_window_geometry(grid, window, radius, std::string(border), num_prefix, tile,
                                                   q.size(1), "S (q.shape[1])");
  const double sc = check_scale(scale, q.size(3));
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  const int64_t E = extra_k.has_value() ? extra_k->size(1) : 0;
  at::Tensor dq = new_output({B, S, H, D}, q.options());
  at::Tensor dk = new_output({B, S, Hkv, D}, q.options());
  at::Tensor dv = new_output({B, S, Hkv, D}, q.options());
  at::Tensor dek = new_output({B, E, Hkv, D}, q.options());
  at::Tensor dev = new_output({B, E, Hkv, D}, q.options());
  if (dq.numel() == 0) return {dq, dk, dv, dek, dev};
  const at::Tensor* ek = extra_k.has_value() ? &*extra_k : nullptr;
  const at::Tensor* ev = extra_v.has_value() ? &*extra_v : nullptr;
  const at::Tensor* dlse = grad_lse.has_value() ? &*grad_lse : nullptr;
  const CircleRows circle(geo);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "dtk::window_attention_backward (CPU)", [&] {
        const GradProblem<scalar_t> gp{grad_out.const_data_ptr<scalar_t>(),
                                       out.const_data_ptr<scalar_t>(),
                                       strides3(&grad_out),
                                       strides3(&out),
                                       lse.const_data_ptr<float>(),
                                       dlse ? dlse->const_data_ptr<float>() : nullptr,
                                       strides3(&lse),
                                       strides3(dlse),
                                       dq.mutable_data_ptr<scalar_t>(),
                                       dk.mutable_data_ptr<scalar_t>(),
                                       dv.mutable_data_ptr<scalar_t>(),
                                       dek.mutable_data_ptr<scalar_t>(),
                                       dev.mutable_data_ptr<scalar_t>()};
        run_backward<scalar_t>(make_problem<scalar_t>(q, k, v, ek, ev, geo, circle, sc), gp);
      });
  return {dq, dk, dv, dek, dev};
}

}  // namespace
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("window_attention", &dtk::window_attention_cpu);
  m.impl("window_attention_backward", &dtk::window_attention_backward_cpu);
}
