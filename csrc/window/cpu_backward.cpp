// CPU engine of dtk::window_attention_backward: per block and chunk (cpu_blocks.h), P recomputed
// from the forward's lse, then the dQ, dK and dV GEMMs.
#include "window/cpu_blocks.h"

namespace dtk {
namespace window_cpu {
namespace {

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
// The op.

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
}  // namespace window_cpu
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("window_attention_backward", &dtk::window_cpu::window_attention_backward_cpu);
}
