// CPU engine of dtk::window_attention, forward: per block of queries and chunk of its keys
// (cpu_blocks.h), scores = Q K^T (one GEMM), the mask, an online-softmax step, acc += P V.
#include "window/cpu_blocks.h"

namespace dtk {
namespace window_cpu {
namespace {

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
// The op.

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

}  // namespace
}  // namespace window_cpu
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("window_attention", &dtk::window_cpu::window_attention_cpu);
}
