// CPU kernels of the sparse-token attention family (multi_kv_attention, segment_attention).
//
// Same plan idea as the GPU engines: for each query set, a list of key ranges (segments, branches)
// visited one chunk at a time with a shared online-softmax state, so no K/V concatenation and no
// S x S mask is ever built. Accumulation in float32 (float64 for float64 inputs), batched GEMMs
// over heads (GQA: the query heads of one K/V head share a GEMM).
#include "common/debug.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

namespace dtk::sparse {
namespace {

using at::Tensor;
constexpr const char* kMkv = "dtk.multi_kv_attention";
constexpr const char* kSeg = "dtk.segment_attention";
constexpr int64_t kKeyChunk = 1024;


using dtk::new_output;  // NaN-filled under DTK_DEBUG_NAN_FILL=1 (common/debug.h)

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void check_bshd(const Tensor& t, const Tensor& q, const char* op, const std::string& name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (B, S, H, D), got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected q's dtype ", q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), ", expected q's device ",
              q.device());
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, op, ": ", name,
              " must have a contiguous last dim (stride 1), got stride ", t.stride(3));
}

double resolve_scale(std::optional<double> scale, int64_t D, const char* op) {
  if (!scale) return 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(*scale > 0 && std::isfinite(*scale), op, ": scale must be a positive finite float, got ", *scale);
  return *scale;
}

// Online softmax over (H, n) query rows; scores are natural-log units.
struct Online {
  Tensor m, l, acc;  // (H,n), (H,n), (H,n,Dv)
  Online(int64_t H, int64_t n, int64_t Dv, const at::TensorOptions& o)
      : m(at::full({H, n}, -std::numeric_limits<double>::infinity(), o)),
        l(at::zeros({H, n}, o)),
        acc(at::zeros({H, n, Dv}, o)) {}

  // qh (H,n,D) already multiplied by the scale; kh, vh (Hkv,m,D) in the accumulation dtype.
  void step(const Tensor& qh, const Tensor& kh, const Tensor& vh, double bias) {
    const int64_t H = qh.size(0), n = qh.size(1), D = qh.size(2), Hkv = kh.size(0);
    const int64_t G = H / Hkv;
    for (int64_t c0 = 0; c0 < kh.size(1); c0 += kKeyChunk) {
      const int64_t len = std::min(kKeyChunk, kh.size(1) - c0);
      Tensor kc = kh.narrow(1, c0, len), vc = vh.narrow(1, c0, len);
      Tensor s = at::bmm(qh.reshape({Hkv, G * n, D}), kc.transpose(1, 2)).view({H, n, len});
      if (bias != 0.0) s.add_(bias);
      Tensor m_new = at::maximum(m, std::get<0>(s.max(-1)));
      Tensor m_safe = at::where(at::isneginf(m_new), at::zeros_like(m_new), m_new);
      Tensor p = (s - m_safe.unsqueeze(-1)).exp_();
      Tensor alpha = (m - m_safe).exp_();
      l = l * alpha + p.sum(-1);
      Tensor pv = at::bmm(p.view({Hkv, G * n, len}), vc).view({H, n, vc.size(2)});
      acc = acc * alpha.unsqueeze(-1) + pv;
      m = m_new;
    }
  }

  // (out (H,n,Dv), lse (H,n)): rows that saw no key give 0 and -inf.
  std::pair<Tensor, Tensor> finish() const {
    Tensor empty = l == 0;
    Tensor l_safe = at::where(empty, at::ones_like(l), l);
    Tensor out = acc / l_safe.unsqueeze(-1);
    Tensor lse = at::where(empty, at::full_like(l, -std::numeric_limits<double>::infinity()), m + l_safe.log());
    return {out, lse};
  }
};

// (B,S,H,D) slice of batch b -> (H, rows, D) in acc dtype.
Tensor heads_first(const Tensor& x, at::ScalarType acc) { return x.to(acc).permute({1, 0, 2}).contiguous(); }

// Checks an index tensor's dtype/shape; returns it as int64 CPU.
Tensor check_index(const Tensor& idx, const char* op, const std::string& name, int64_t B, const Tensor& q) {
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": ", name,
              " must be an int32 or int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == q.device(), op, ": ", name, " is on ", idx.device(), ", expected q's device ",
              q.device());
  return idx.to(at::kLong).contiguous();
}

void check_range(const Tensor& idx, int64_t limit, const char* op, const std::string& name) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < limit, op, ": ", name, " out of range: entries must be in [0, ", limit,
              ") or -1 (padding), got values in [", lo, ", ", hi, "]");
}

struct MkvArgs {
  int64_t B, Sq, H, D, Hkv, nseg;
  double scale;
  std::vector<Tensor> kidx;  // per segment: undefined, or (B, m) int64
};

MkvArgs check_mkv(const Tensor& q, at::TensorList ks, at::TensorList vs, const c10::List<std::optional<Tensor>>& kv_index,
                  const std::optional<Tensor>& q_index, std::optional<double> scale) {
  const char* op = kMkv;
  check_bshd(q, q, op, "q");
  MkvArgs a{};
  a.B = q.size(0), a.Sq = q.size(1), a.H = q.size(2), a.D = q.size(3);
  TORCH_CHECK(ks.size() == vs.size(), op, ": ks and vs must have the same number of segments, got ", ks.size(),
              " and ", vs.size());
  TORCH_CHECK(!ks.empty(), op, ": ks must hold at least one K/V segment");
  TORCH_CHECK(kv_index.size() == 0 || kv_index.size() == ks.size(), op, ": kv_index must hold one entry (tensor or None) per "
              "segment (", ks.size(), "), got ", kv_index.size());
  a.nseg = static_cast<int64_t>(ks.size());
  a.Hkv = ks[0].dim() == 4 ? ks[0].size(2) : -1;
  for (int64_t i = 0; i < a.nseg; ++i) {
    const std::string kn = "ks[" + std::to_string(i) + "]", vn = "vs[" + std::to_string(i) + "]";
    check_bshd(ks[i], q, op, kn);
    check_bshd(vs[i], q, op, vn);
    TORCH_CHECK(ks[i].size(0) == a.B && ks[i].size(2) == a.Hkv && ks[i].size(3) == a.D, op, ": ", kn,
                " must be (B=", a.B, ", L, H_kv=", a.Hkv, ", D=", a.D, "), got ", ks[i].sizes(),
                " (mismatched segments)");
    TORCH_CHECK(vs[i].sizes() == ks[i].sizes(), op, ": ", vn, " must have the shape of ", kn, " ", ks[i].sizes(),
                ", got ", vs[i].sizes(), " (mismatched segments)");
  }
  TORCH_CHECK(a.Hkv > 0 && a.H % a.Hkv == 0, op, ": q heads (", a.H, ") must be a multiple of k/v heads (", a.Hkv,
              ")");
  a.scale = resolve_scale(scale, a.D, op);
  a.kidx.resize(a.nseg);
  for (int64_t i = 0; i < static_cast<int64_t>(kv_index.size()); ++i) {
    std::optional<Tensor> t = kv_index.get(i);
    if (!t.has_value() || !t->defined()) continue;
    const std::string name = "kv_index[" + std::to_string(i) + "]";
    Tensor idx = check_index(*t, op, name, a.B, q);
    TORCH_CHECK(idx.dim() == 1 || (idx.dim() == 2 && idx.size(0) == a.B), op, ": ", name,
                " must be (m,) or (B=", a.B, ", m), got shape ", idx.sizes());
    check_range(idx, ks[i].size(1), op, name);
    a.kidx[i] = idx.dim() == 1 ? idx.unsqueeze(0).expand({a.B, idx.size(0)}) : idx;
  }
  if (q_index.has_value()) {
    Tensor qi = check_index(*q_index, op, "q_index", a.B, q);
    TORCH_CHECK(qi.dim() == 2 && qi.size(0) == a.B, op, ": q_index must be (B=", a.B, ", n), got shape ", qi.sizes());
    check_range(qi, a.Sq, op, "q_index");
  }
  return a;
}

// Attention of the selected rows of batch b: (out (H,n,D), lse (H,n)) in acc dtype; rows == undefined: all.
std::pair<Tensor, Tensor> mkv_batch(const Tensor& q, at::TensorList ks, at::TensorList vs, const MkvArgs& a,
                                    int64_t b, const Tensor& rows) {
  const at::ScalarType acc = acc_type(q);
  Tensor qb = q[b];
  Tensor valid;
  if (rows.defined()) {
    valid = rows >= 0;
    qb = qb.index_select(0, rows.clamp_min(0));
  }
  Tensor qh = heads_first(qb, acc) * a.scale;  // (never in place: may be a view of q)
  Online st(a.H, qh.size(1), a.D, qh.options());
  for (int64_t i = 0; i < a.nseg; ++i) {
    Tensor kb = ks[i][b], vb = vs[i][b];
    if (a.kidx[i].defined()) {
      Tensor ki = a.kidx[i][b];
      ki = ki.masked_select(ki >= 0);
      kb = kb.index_select(0, ki);
      vb = vb.index_select(0, ki);
    }
    if (kb.size(0) == 0 || qh.size(1) == 0) continue;
    st.step(qh, heads_first(kb, acc), heads_first(vb, acc), 0.0);
  }
  auto [out, lse] = st.finish();
  if (valid.defined()) {  // padding rows: 0 and -inf
    out = out.masked_fill(~valid.view({1, -1, 1}), 0.0);
    lse = lse.masked_fill(~valid.view({1, -1}), -std::numeric_limits<double>::infinity());
  }
  return {out, lse};
}

std::tuple<Tensor, Tensor> multi_kv_attention_cpu(const Tensor& q, at::TensorList ks, at::TensorList vs,
                                                  const c10::List<std::optional<Tensor>>& kv_index,
                                                  const std::optional<Tensor>& q_index, std::optional<double> scale) {
  MkvArgs a = check_mkv(q, ks, vs, kv_index, q_index, scale);
  Tensor qi = q_index.has_value() ? q_index->to(at::kLong) : Tensor();
  const int64_t n = qi.defined() ? qi.size(1) : a.Sq;
  Tensor out = new_output({a.B, n, a.H, a.D}, q.options());
  Tensor lse = new_output({a.B, a.H, n}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < a.B; ++b) {
    auto [o, l] = mkv_batch(q, ks, vs, a, b, qi.defined() ? qi[b] : Tensor());
    out[b].copy_(o.permute({1, 0, 2}));
    lse[b].copy_(l);
  }
  return {out, lse};
}

Tensor multi_kv_attention_out_cpu(const Tensor& q, at::TensorList ks, at::TensorList vs,
                                  const c10::List<std::optional<Tensor>>& kv_index, const Tensor& q_index,
                                  std::optional<double> scale, Tensor& out) {
  MkvArgs a = check_mkv(q, ks, vs, kv_index, q_index, scale);
  TORCH_CHECK(out.sizes() == q.sizes(), kMkv, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.device() == q.device(), kMkv,
              ": out must match q's dtype ", q.scalar_type(), " and device ", q.device(), ", got ", out.scalar_type(),
              " on ", out.device());
  Tensor qi = q_index.to(at::kLong);
  const int64_t n = qi.size(1);
  Tensor lse = new_output({a.B, a.H, n}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < a.B; ++b) {
    Tensor rows = qi[b];
    auto [o, l] = mkv_batch(q, ks, vs, a, b, rows);
    lse[b].copy_(l);
    Tensor valid = rows >= 0;
    Tensor r = rows.masked_select(valid);
    if (r.numel() == 0) continue;
    Tensor src = o.permute({1, 0, 2}).index_select(0, valid.nonzero().squeeze(1)).to(out.scalar_type());
    out[b].index_copy_(0, r, src);
  }
  return lse;
}

std::tuple<Tensor, Tensor> segment_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& cu_seqlens, const Tensor& group_mask,
                                                 const std::optional<Tensor>& group_bias, std::optional<double> scale) {
  const char* op = kSeg;
  check_bshd(q, q, op, "q");
  check_bshd(k, q, op, "k");
  check_bshd(v, q, op, "v");
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hkv = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(0) == B && k.size(1) == S && k.size(3) == D, op, ": k must be (B=", B, ", S=", S,
              ", H_kv, D=", D, "), got ", k.sizes());
  TORCH_CHECK(H % Hkv == 0, op, ": q heads (", H, ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, op,
              ": cu_seqlens must be 1-D with G+1 >= 2 entries, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  const int64_t G = cu_seqlens.numel() - 1;
  TORCH_CHECK(group_mask.scalar_type() == at::kBool, op, ": group_mask must be a bool tensor, got ",
              group_mask.scalar_type());
  TORCH_CHECK(group_mask.dim() == 2 && group_mask.size(0) == G && group_mask.size(1) == G, op,
              ": group_mask must be G x G = ", G, " x ", G, " (G = len(cu_seqlens) - 1), got shape ", group_mask.sizes());
  if (group_bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(group_bias->scalar_type()), op, ": group_bias must be a floating tensor, got ",
                group_bias->scalar_type());
    TORCH_CHECK(group_bias->dim() == 2 && group_bias->size(0) == G && group_bias->size(1) == G, op,
                ": group_bias must be G x G = ", G, " x ", G, ", got shape ", group_bias->sizes());
  }
  const double sc = resolve_scale(scale, D, op);
  Tensor cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] == 0, op, ": cu_seqlens must start at 0, got ", c[0]);
  for (int64_t g = 1; g <= G; ++g)
    TORCH_CHECK(c[g] >= c[g - 1], op, ": cu_seqlens must be non-decreasing, got ", c[g - 1], " then ", c[g]);
  TORCH_CHECK(c[G] == S, op, ": cu_seqlens must end at the sequence length S=", S, ", got ", c[G]);
  Tensor gm = group_mask.to(at::kCPU).contiguous();
  Tensor gb = group_bias.has_value() ? group_bias->to(at::kCPU, at::kDouble).contiguous() : Tensor();
  const bool* gmp = gm.data_ptr<bool>();
  const at::ScalarType acc = acc_type(q);
  Tensor out = new_output({B, S, H, D}, q.options());
  Tensor lse = new_output({B, H, S}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const Tensor kh = heads_first(k[b], acc), vh = heads_first(v[b], acc);  // (Hkv, S, D), once per batch
    for (int64_t a = 0; a < G; ++a) {
      const int64_t qs = c[a], qn = c[a + 1] - c[a];
      if (qn == 0) continue;
      Tensor qh = heads_first(q[b].narrow(0, qs, qn), acc) * sc;
      Online st(H, qn, D, qh.options());
      const double* gbp = gb.defined() ? gb.data_ptr<double>() : nullptr;
      for (int64_t kb = 0; kb < G; ++kb) {
        if (!gmp[a * G + kb]) continue;  // masked branch pairs are skipped, not computed
        const double bias = gbp ? gbp[a * G + kb] : 0.0;
        int64_t ke = kb;  // merge a run of adjacent allowed branches with the same bias into one range
        while (ke + 1 < G && gmp[a * G + ke + 1] && (gbp ? gbp[a * G + ke + 1] : 0.0) == bias) ++ke;
        const int64_t ks = c[kb], kn = c[ke + 1] - c[kb];
        if (kn > 0) st.step(qh, kh.narrow(1, ks, kn), vh.narrow(1, ks, kn), bias);
        kb = ke;
      }
      auto [o, l] = st.finish();
      out[b].narrow(0, qs, qn).copy_(o.permute({1, 0, 2}));
      lse[b].narrow(1, qs, qn).copy_(l);
    }
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("multi_kv_attention", &multi_kv_attention_cpu);
  m.impl("multi_kv_attention_out", &multi_kv_attention_out_cpu);
  m.impl("segment_attention", &segment_attention_cpu);
}

}  // namespace dtk::sparse
