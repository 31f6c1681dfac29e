// CPU kernels of the sparse-token attention family (multi_kv_attention, segment_attention) and of
// their backwards.
//
// Same plan idea as the GPU engines: for each query set, a list of key ranges (segments, branches;
// mkv_ranges / seg_ranges) visited one chunk at a time (for_each_chunk), so no K/V concatenation and
// no S x S mask is ever built. The forward keeps an online-softmax state over the chunks; the
// backward runs over the same chunks with P recomputed from the lse. Accumulation in float32
// (float64 for float64 inputs), batched GEMMs over heads (GQA: the query heads of one K/V head share
// a GEMM).
//
// Argument checks: check_mkv / check_segment, from csrc/common/checks.h, mirror the Python checks of
// python/dtk/ops/sparse/checks.py (same exception types, errors naming the argument and the op).
#include "common/checks.h"
#include "common/debug.h"
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace dtk::sparse {
namespace {

using at::Tensor;
constexpr const char* kMkv = "dtk.multi_kv_attention";
constexpr const char* kMkvBwd = "dtk.multi_kv_attention_backward";
constexpr const char* kSeg = "dtk.segment_attention";
constexpr const char* kSegBwd = "dtk.segment_attention_backward";
constexpr int64_t kKeyChunk = 1024;
constexpr int64_t kQueryBlock = 128;  // backward: query rows per block, bounds its (group * rows, chunk) tiles
constexpr double kInf = std::numeric_limits<double>::infinity();


using dtk::new_output;  // NaN-filled under DTK_DEBUG_NAN_FILL=1 (common/debug.h)

at::ScalarType acc_type(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (B,S,H,D) slice of batch b -> (H, rows, D) in acc dtype (may be a view of x: never write to it).
Tensor heads_first(const Tensor& x, at::ScalarType acc) { return x.to(acc).permute({1, 0, 2}).contiguous(); }

// (H, n, X) -> (Hkv, G * n, X): the rows of the G query heads sharing a K/V head, for one GEMM.
Tensor by_kv_head(const Tensor& x, int64_t Hkv) { return x.view({Hkv, -1, x.size(-1)}); }

// ---------------------------------------------------------------------------------------------
// Key ranges: what one query set attends to, shared by the forwards and the backwards.

// A run of keys: K, V (Hkv', m, D) in the acc dtype (Hkv' = the K/V heads of the call), the bias added
// to its scores, and where its rows come from (for the backward's dK, dV): rows `index` (m,) int64 of
// key source `src` (a segment), or rows [start, start + m) when index is undefined.
struct KeyRange {
  Tensor k, v;
  double bias;
  int64_t src;
  Tensor index;
  int64_t start;
};

// Calls f(chunk) for the chunks of at most kKeyChunk keys of each range (a chunk is a KeyRange too).
template <typename F>
void for_each_chunk(const std::vector<KeyRange>& ranges, F&& f) {
  for (const KeyRange& r : ranges) {
    const int64_t m = r.k.size(1);
    for (int64_t c0 = 0; c0 < m; c0 += kKeyChunk) {
      const int64_t len = std::min(kKeyChunk, m - c0);
      f(KeyRange{r.k.narrow(1, c0, len), r.v.narrow(1, c0, len), r.bias, r.src,
                 r.index.defined() ? r.index.narrow(0, c0, len) : Tensor(), r.start + c0});
    }
  }
}

// Scores (H, n, len) of qh (H, n, D), already times the scale, against a chunk's keys, plus its bias.
Tensor scores(const Tensor& qh, const KeyRange& c) {
  Tensor s = at::bmm(by_kv_head(qh, c.k.size(0)), c.k.transpose(1, 2)).view({qh.size(0), qh.size(1), c.k.size(1)});
  if (c.bias != 0.0) s.add_(c.bias);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Online softmax over (H, n) query rows; scores are natural-log units.
struct Online {
  Tensor m, l, acc;  // (H,n), (H,n), (H,n,Dv)
  Online(int64_t H, int64_t n, int64_t Dv, const at::TensorOptions& o)
      : m(at::full({H, n}, -kInf, o)), l(at::zeros({H, n}, o)), acc(at::zeros({H, n, Dv}, o)) {}

  // One chunk; qh (H,n,D) already multiplied by the scale.
  void step(const Tensor& qh, const KeyRange& c) {
    Tensor s = scores(qh, c);
    Tensor m_new = at::maximum(m, std::get<0>(s.max(-1)));
    Tensor m_safe = at::where(at::isneginf(m_new), at::zeros_like(m_new), m_new);
    Tensor p = (s - m_safe.unsqueeze(-1)).exp_();
    Tensor alpha = (m - m_safe).exp_();
    l = l * alpha + p.sum(-1);
    Tensor pv = at::bmm(by_kv_head(p, c.k.size(0)), c.v).view({qh.size(0), qh.size(1), c.v.size(2)});
    acc = acc * alpha.unsqueeze(-1) + pv;
    m = m_new;
  }

  // (out (H,n,Dv), lse (H,n)): rows that saw no key give 0 and -inf.
  std::pair<Tensor, Tensor> finish() const {
    Tensor empty = l == 0;
    Tensor l_safe = at::where(empty, at::ones_like(l), l);
    Tensor out = acc / l_safe.unsqueeze(-1);
    Tensor lse = at::where(empty, at::full_like(l, -kInf), m + l_safe.log());
    return {out, lse};
  }
};

struct MkvArgs {
  int64_t B, Sq, H, D, Hkv, nseg;
  double scale;
  std::vector<Tensor> kidx;  // per segment: undefined, or (B, m) int64
};

// The checks of a multi_kv_attention call (the Python ones, ops/sparse/checks.py, in the same order
// where it matters); errors name the argument and the op (`op`).
MkvArgs check_mkv(const Tensor& q, at::TensorList ks, at::TensorList vs,
                  const c10::List<std::optional<Tensor>>& kv_index, const std::optional<Tensor>& q_index,
                  std::optional<double> scale, const char* op = kMkv) {
  return checks_of(op, [&] {
    check_bshd_like(q, "q", q);
    MkvArgs a{};
    a.B = q.size(0), a.Sq = q.size(1), a.H = q.size(2), a.D = q.size(3);
    TORCH_CHECK_VALUE(ks.size() == vs.size(), "ks and vs must have the same number of segments, got ", ks.size(),
                      " and ", vs.size());
    TORCH_CHECK_VALUE(!ks.empty(), "ks must hold at least one K/V segment");
    a.nseg = static_cast<int64_t>(ks.size());
    a.Hkv = ks[0].dim() == 4 ? ks[0].size(2) : -1;
    for (int64_t i = 0; i < a.nseg; ++i) {
      const std::string kn = "ks[" + std::to_string(i) + "]", vn = "vs[" + std::to_string(i) + "]";
      check_bshd_like(ks[i], kn.c_str(), q);
      check_bshd_like(vs[i], vn.c_str(), q);
      TORCH_CHECK_VALUE(ks[i].size(0) == a.B && ks[i].size(2) == a.Hkv && ks[i].size(3) == a.D, kn, " must be (B=", a.B,
                        ", L, H_kv=", a.Hkv, ", D=", a.D, "), got ", ks[i].sizes(), " (mismatched segments)");
      TORCH_CHECK_VALUE(vs[i].sizes() == ks[i].sizes(), vn, " must have the shape of ", kn, " ", ks[i].sizes(),
                        ", got ", vs[i].sizes(), " (mismatched segments)");
    }
    TORCH_CHECK_VALUE(a.H % a.Hkv == 0, "q heads (", a.H, ") must be a multiple of k/v heads (", a.Hkv, ")");
    TORCH_CHECK_VALUE(kv_index.size() == 0 || kv_index.size() == ks.size(),
                      "kv_index must hold one entry (tensor or None) per segment (", ks.size(), "), got ",
                      kv_index.size());
    a.kidx.resize(a.nseg);
    for (int64_t i = 0; i < static_cast<int64_t>(kv_index.size()); ++i) {
      std::optional<Tensor> t = kv_index.get(i);
      if (!t.has_value() || !t->defined()) continue;
      const std::string name = "kv_index[" + std::to_string(i) + "]";
      TORCH_CHECK_VALUE(t->dim() == 1 || t->dim() == 2, name, " must be (m,) or (B=", a.B, ", m), got shape ",
                        t->sizes());
      check_index_tensor(*t, name.c_str(), q);
      TORCH_CHECK_VALUE(t->dim() == 1 || t->size(0) == a.B, name, " has shape ", t->sizes(), "; expected (m,) or (",
                        a.B, ", m)");
      Tensor idx = t->to(at::kLong).contiguous();
      check_index_range(idx, ks[i].size(1), name.c_str());
      a.kidx[i] = idx.dim() == 1 ? idx.unsqueeze(0).expand({a.B, idx.size(0)}) : idx;
    }
    if (q_index.has_value()) {
      TORCH_CHECK_VALUE(q_index->dim() == 2, "q_index must be (B=", a.B, ", n), got shape ", q_index->sizes());
      check_index_tensor(*q_index, "q_index", q);
      TORCH_CHECK_VALUE(q_index->size(0) == a.B, "q_index has shape ", q_index->sizes(), "; expected (", a.B, ", n)");
      check_index_range(*q_index, a.Sq, "q_index");
    }
    a.scale = check_scale(scale, a.D);
    return a;
  });
}

// The key ranges of multi_kv_attention in batch b for K/V heads [h0, h0 + nh): one per non-empty
// segment (src = its number), its kv_index entries gathered with the padding dropped.
std::vector<KeyRange> mkv_ranges(at::TensorList ks, at::TensorList vs, const MkvArgs& a, int64_t b, int64_t h0,
                                 int64_t nh, at::ScalarType acc) {
  std::vector<KeyRange> ranges;
  for (int64_t i = 0; i < a.nseg; ++i) {
    Tensor kb = ks[i][b].narrow(1, h0, nh), vb = vs[i][b].narrow(1, h0, nh), ki;
    if (a.kidx[i].defined()) {
      ki = a.kidx[i][b];
      ki = ki.masked_select(ki >= 0);
      kb = kb.index_select(0, ki);
      vb = vb.index_select(0, ki);
    }
    if (kb.size(0) > 0) ranges.push_back({heads_first(kb, acc), heads_first(vb, acc), 0.0, i, ki, 0});
  }
  return ranges;
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
  if (qh.size(1) > 0)
    for_each_chunk(mkv_ranges(ks, vs, a, b, 0, a.Hkv, acc), [&](const KeyRange& c) { st.step(qh, c); });
  auto [out, lse] = st.finish();
  if (valid.defined()) {  // padding rows: 0 and -inf
    out = out.masked_fill(~valid.view({1, -1, 1}), 0.0);
    lse = lse.masked_fill(~valid.view({1, -1}), -kInf);
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
  checks_of(kMkv, [&] {
    TORCH_CHECK_VALUE(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
    TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type() && out.device() == q.device(), "out must match q's dtype ",
                     q.scalar_type(), " and device ", q.device(), ", got ", out.scalar_type(), " on ", out.device());
  });
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

struct SegArgs {
  int64_t B, S, H, D, Hkv, G;
  double scale;
  Tensor cu, gm, gb;  // CPU, contiguous: (G+1,) int64 offsets, (G,G) bool, (G,G) float64 or undefined
  const int64_t* offsets() const { return cu.const_data_ptr<int64_t>(); }
};

// The checks of a segment_attention call (as ops/sparse/checks.py); errors name the argument and
// the op (`op`).
SegArgs check_segment(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens,
                      const Tensor& group_mask, const std::optional<Tensor>& group_bias, std::optional<double> scale,
                      const char* op = kSeg) {
  return checks_of(op, [&] {
    check_bshd_like(q, "q", q);
    check_bshd_like(k, "k", q);
    check_bshd_like(v, "v", q);
    SegArgs s{};
    s.B = q.size(0), s.S = q.size(1), s.H = q.size(2), s.D = q.size(3), s.Hkv = k.size(2);
    TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK_VALUE(k.size(0) == s.B && k.size(1) == s.S && k.size(3) == s.D, "k must be (B=", s.B, ", S=", s.S,
                      ", H_kv, D=", s.D, "), got ", k.sizes());
    TORCH_CHECK_VALUE(s.H % s.Hkv == 0, "q heads (", s.H, ") must be a multiple of k/v heads (", s.Hkv, ")");
    TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2,
                      "cu_seqlens must be a 1-D tensor with G+1 >= 2 entries, got shape ", cu_seqlens.sizes());
    TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
    const int64_t G = s.G = cu_seqlens.numel() - 1;
    TORCH_CHECK_TYPE(group_mask.scalar_type() == at::kBool, "group_mask must be a bool tensor, got ",
                     group_mask.scalar_type());
    TORCH_CHECK_VALUE(group_mask.dim() == 2 && group_mask.size(0) == G && group_mask.size(1) == G,
                      "group_mask must be G x G = ", G, " x ", G, " (G = len(cu_seqlens) - 1), got shape ",
                      group_mask.sizes());
    if (group_bias.has_value()) {
      TORCH_CHECK_TYPE(at::isFloatingType(group_bias->scalar_type()), "group_bias must be a floating tensor, got ",
                       group_bias->scalar_type());
      TORCH_CHECK_VALUE(group_bias->dim() == 2 && group_bias->size(0) == G && group_bias->size(1) == G,
                        "group_bias must be G x G = ", G, " x ", G, ", got shape ", group_bias->sizes());
    }
    s.cu = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
    const int64_t* c = s.offsets();
    TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens must start at 0, got ", c[0]);
    for (int64_t g = 1; g <= G; ++g)
      TORCH_CHECK_VALUE(c[g] >= c[g - 1], "cu_seqlens must be non-decreasing, got ", c[g - 1], " then ", c[g]);
    TORCH_CHECK_VALUE(c[G] == s.S, "cu_seqlens must end at the sequence length S=", s.S, ", got ", c[G]);
    s.scale = check_scale(scale, s.D);
    s.gm = group_mask.to(at::kCPU).contiguous();
    if (group_bias.has_value()) s.gb = group_bias->to(at::kCPU, at::kDouble).contiguous();
    return s;
  });
}

// The key ranges query branch qa of segment_attention sees, in kh, vh (Hkv', S, D) (acc dtype).
std::vector<KeyRange> seg_ranges(const SegArgs& s, int64_t qa, const Tensor& kh, const Tensor& vh) {
  const int64_t* c = s.offsets();
  const bool* gm = s.gm.const_data_ptr<bool>() + qa * s.G;
  const double* gb = s.gb.defined() ? s.gb.const_data_ptr<double>() + qa * s.G : nullptr;
  std::vector<KeyRange> ranges;
  for (int64_t kb = 0; kb < s.G; ++kb) {
    if (!gm[kb]) continue;  // masked branch pairs are skipped, not computed
    const double bias = gb ? gb[kb] : 0.0;
    int64_t ke = kb;  // merge a run of adjacent allowed branches with the same bias into one range
    while (ke + 1 < s.G && gm[ke + 1] && (gb ? gb[ke + 1] : 0.0) == bias) ++ke;
    const int64_t start = c[kb], len = c[ke + 1] - c[kb];
    if (len > 0) ranges.push_back({kh.narrow(1, start, len), vh.narrow(1, start, len), bias, 0, Tensor(), start});
    kb = ke;
  }
  return ranges;
}

std::tuple<Tensor, Tensor> segment_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& cu_seqlens, const Tensor& group_mask,
                                                 const std::optional<Tensor>& group_bias, std::optional<double> scale) {
  const SegArgs s = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale);
  const int64_t* c = s.offsets();
  const at::ScalarType acc = acc_type(q);
  Tensor out = new_output({s.B, s.S, s.H, s.D}, q.options());
  Tensor lse = new_output({s.B, s.H, s.S}, q.options().dtype(at::kFloat));
  for (int64_t b = 0; b < s.B; ++b) {
    const Tensor kh = heads_first(k[b], acc), vh = heads_first(v[b], acc);  // (Hkv, S, D), once per batch
    for (int64_t a = 0; a < s.G; ++a) {
      const int64_t qs = c[a], qn = c[a + 1] - c[a];
      if (qn == 0) continue;
      Tensor qh = heads_first(q[b].narrow(0, qs, qn), acc) * s.scale;
      Online st(s.H, qn, s.D, qh.options());
      for_each_chunk(seg_ranges(s, a, kh, vh), [&](const KeyRange& ch) { st.step(qh, ch); });
      auto [o, l] = st.finish();
      out[b].narrow(0, qs, qn).copy_(o.permute({1, 0, 2}));
      lse[b].narrow(1, qs, qn).copy_(l);
    }
  }
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward. Per query block (the q heads of one K/V head) and key chunk, P recomputed from the lse:
//   P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K (times scale at the end),
//   dK[keys] += dS^T (scale Q), dV[keys] += P^T dO,   delta = rowsum(dO * out) - grad_lse.
// dK and dV rows go back to their keys, which every query set of a batch may reach: a work item is
// a whole (batch, K/V head) with its own opmath dK, dV buffers (disjoint outputs, no races).

// The backward's own inputs: grad_out, out like the forward's output (B, n, H, D); lse, grad_lse
// (B, H, n) float32 (grad_lse may be undefined).
struct GradInputs {
  Tensor dout, out, lse, dlse;
};

// dK, dV of one work item, per key source (segment; the whole sequence for segment_attention):
// (Hkv', L, D) in the acc dtype.
struct KeyGrads {
  std::vector<Tensor> dk, dv;

  void add(const KeyRange& c, const Tensor& dkc, const Tensor& dvc) {
    Tensor &dk_src = dk[c.src], &dv_src = dv[c.src];
    if (c.index.defined()) {  // index_add_: repeated kv_index entries add up
      dk_src.index_add_(1, c.index, dkc);
      dv_src.index_add_(1, c.index, dvc);
    } else {
      dk_src.narrow(1, c.start, dkc.size(1)).add_(dkc);
      dv_src.narrow(1, c.start, dvc.size(1)).add_(dvc);
    }
  }
};

// Backward state of one query block: rows [r0, r0 + nb) of the forward's output in batch b, q heads
// [h0, h0 + nh); all (nh, nb, *) in the acc dtype. Every input may be a view of the caller's
// tensors, hence out-of-place ops on them.
struct QueryGrad {
  Tensor q, dout, lse, delta, dq;  // scale * q, grad_out, lse, delta; dq accumulates dS K
  Tensor l;                        // float64: sum_j exp(s_j - lse) of the lse-refining walk
  double scale;

  // q_rows: (nb, nh, D) query rows of the block; valid: (nb,) bool (q_index padding) or undefined.
  QueryGrad(const Tensor& q_rows, const GradInputs& gi, int64_t b, int64_t r0, int64_t nb, int64_t h0, int64_t nh,
            const Tensor& valid, double scale, at::ScalarType acc)
      : scale(scale) {
    const auto rows = [&](const Tensor& x) { return heads_first(x[b].narrow(0, r0, nb).narrow(1, h0, nh), acc); };
    const auto per_row = [&](const Tensor& x) { return x[b].narrow(0, h0, nh).narrow(1, r0, nb).to(acc); };
    q = heads_first(q_rows, acc) * scale;
    Tensor dout_all = rows(gi.dout), lse_all = per_row(gi.lse);
    Tensor delta_all = (dout_all * rows(gi.out)).sum(-1);
    if (gi.dlse.defined()) delta_all = delta_all - per_row(gi.dlse);
    // Rows that saw no key (lse = -inf) and padding rows contribute nothing: lse = +inf gives P = 0,
    // and dO = delta = 0 keeps their (unused) values out of the sums.
    Tensor dead = ~at::isfinite(lse_all);
    if (valid.defined()) dead = dead | ~valid.unsqueeze(0);
    lse = lse_all.masked_fill(dead, kInf);
    delta = delta_all.masked_fill(dead, 0.0);
    dout = dout_all.masked_fill(dead.unsqueeze(-1), 0.0);
    dq = at::zeros_like(q);
  }

  // The block's backward over its key ranges. The lse is float32, which would cap float64 gradients
  // at float32 accuracy: for float64 a first walk refines it, lse += log(sum_j exp(s_j - lse)).
  void run(const std::vector<KeyRange>& ranges, KeyGrads& kg) {
    if (q.scalar_type() == at::kDouble) {
      l = at::zeros_like(lse);
      for_each_chunk(ranges, [&](const KeyRange& c) { l.add_(probs(c).sum(-1)); });
      lse = at::where(l > 0, lse + l.log(), lse);  // dead rows: l = 0, lse stays +inf
    }
    for_each_chunk(ranges, [&](const KeyRange& c) { step(c, kg); });
  }

  // dq of the block's rows: (nb, nh, D).
  Tensor dq_rows() const { return (dq * scale).permute({1, 0, 2}); }

 private:
  Tensor probs(const KeyRange& c) const { return (scores(q, c) - lse.unsqueeze(-1)).exp_(); }

  void step(const KeyRange& c, KeyGrads& kg) {
    const int64_t Hkv = c.k.size(0);
    Tensor p = probs(c);  // (nh, nb, len)
    Tensor ds = at::bmm(by_kv_head(dout, Hkv), c.v.transpose(1, 2)).view_as(p);  // dP
    ds.sub_(delta.unsqueeze(-1)).mul_(p);
    by_kv_head(dq, Hkv).baddbmm_(by_kv_head(ds, Hkv), c.k);
    kg.add(c, at::bmm(by_kv_head(ds, Hkv).transpose(1, 2), by_kv_head(q, Hkv)),
           at::bmm(by_kv_head(p, Hkv).transpose(1, 2), by_kv_head(dout, Hkv)));
  }
};

// Runs f(b, hk) for each (batch, K/V head) work item. With fewer items than threads they run one
// after the other, so that the ATen ops inside them use the threads instead.
template <typename F>
void for_each_work_item(int64_t B, int64_t Hkv, const F& f) {
  const int64_t items = B * Hkv;
  const auto body = [&](int64_t i0, int64_t i1) {
    // Worker threads do not inherit the caller's dispatch state: keep autograd out of the ATen ops.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = i0; i < i1; ++i) f(i / Hkv, i % Hkv);
  };
  if (items < at::get_num_threads()) {
    body(0, items);
  } else {
    at::parallel_for(0, items, 1, body);
  }
}

// (H', L, D) zero buffers, one per key source.
std::vector<Tensor> zero_buffers(const std::vector<int64_t>& lengths, int64_t nh, int64_t D, at::ScalarType acc) {
  std::vector<Tensor> bufs;
  for (int64_t L : lengths) bufs.push_back(at::zeros({nh, L, D}, at::TensorOptions().dtype(acc)));
  return bufs;
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>> multi_kv_attention_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, at::TensorList ks,
    at::TensorList vs, const c10::List<std::optional<Tensor>>& kv_index, const std::optional<Tensor>& q_index,
    std::optional<double> scale, const Tensor& out, const Tensor& lse) {
  const MkvArgs a = check_mkv(q, ks, vs, kv_index, q_index, scale, kMkvBwd);
  const Tensor qi = q_index.has_value() ? q_index->to(at::kLong) : Tensor();
  const int64_t n = qi.defined() ? qi.size(1) : a.Sq, G = a.H / a.Hkv;
  const GradInputs gi{grad_out, out, lse, grad_lse.value_or(Tensor())};
  checks_of(kMkvBwd, [&] { check_grads(gi.dout, gi.dlse, gi.out, gi.lse, q, n); });
  const at::ScalarType acc = acc_type(q);
  Tensor dq = new_output(q.sizes(), q.options());
  std::vector<Tensor> dks, dvs;
  std::vector<int64_t> lengths;
  for (int64_t i = 0; i < a.nseg; ++i) {
    dks.push_back(new_output(ks[i].sizes(), q.options()));
    dvs.push_back(new_output(vs[i].sizes(), q.options()));
    lengths.push_back(ks[i].size(1));
  }
  for_each_work_item(a.B, a.Hkv, [&](int64_t b, int64_t hk) {
    const int64_t h0 = hk * G;
    const std::vector<KeyRange> ranges = mkv_ranges(ks, vs, a, b, hk, 1, acc);
    KeyGrads kg{zero_buffers(lengths, 1, a.D, acc), zero_buffers(lengths, 1, a.D, acc)};
    Tensor dqb = at::zeros({a.Sq, G, a.D}, at::TensorOptions().dtype(acc));  // rows no query reaches stay 0
    const Tensor qb = q[b].narrow(1, h0, G), rows = qi.defined() ? qi[b] : Tensor();
    for (int64_t r0 = 0; r0 < n; r0 += kQueryBlock) {
      const int64_t nb = std::min(kQueryBlock, n - r0);
      if (!rows.defined()) {
        QueryGrad g(qb.narrow(0, r0, nb), gi, b, r0, nb, h0, G, Tensor(), a.scale, acc);
        g.run(ranges, kg);
        dqb.narrow(0, r0, nb).copy_(g.dq_rows());
        continue;
      }
      const Tensor r = rows.narrow(0, r0, nb), rc = r.clamp_min(0);
      QueryGrad g(qb.index_select(0, rc), gi, b, r0, nb, h0, G, r >= 0, a.scale, acc);
      g.run(ranges, kg);
      dqb.index_add_(0, rc, g.dq_rows());  // duplicates add up; padding rows add zeros
    }
    dq[b].narrow(1, h0, G).copy_(dqb);
    for (int64_t i = 0; i < a.nseg; ++i) {
      dks[i][b].narrow(1, hk, 1).copy_(kg.dk[i].permute({1, 0, 2}));
      dvs[i][b].narrow(1, hk, 1).copy_(kg.dv[i].permute({1, 0, 2}));
    }
  });
  return {dq, dks, dvs};
}

std::tuple<Tensor, Tensor, Tensor> segment_attention_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& cu_seqlens, const Tensor& group_mask, const std::optional<Tensor>& group_bias,
    std::optional<double> scale, const Tensor& out, const Tensor& lse) {
  const SegArgs s = check_segment(q, k, v, cu_seqlens, group_mask, group_bias, scale, kSegBwd);
  const GradInputs gi{grad_out, out, lse, grad_lse.value_or(Tensor())};
  checks_of(kSegBwd, [&] { check_grads(gi.dout, gi.dlse, gi.out, gi.lse, q, s.S); });
  const int64_t* c = s.offsets();
  const int64_t G = s.H / s.Hkv;
  const at::ScalarType acc = acc_type(q);
  Tensor dq = new_output(q.sizes(), q.options());
  Tensor dk = new_output(k.sizes(), q.options()), dv = new_output(v.sizes(), q.options());
  for_each_work_item(s.B, s.Hkv, [&](int64_t b, int64_t hk) {
    const int64_t h0 = hk * G;
    const Tensor kh = heads_first(k[b].narrow(1, hk, 1), acc), vh = heads_first(v[b].narrow(1, hk, 1), acc);
    KeyGrads kg{zero_buffers({s.S}, 1, s.D, acc), zero_buffers({s.S}, 1, s.D, acc)};
    for (int64_t qa = 0; qa < s.G; ++qa) {
      const std::vector<KeyRange> ranges = seg_ranges(s, qa, kh, vh);
      for (int64_t r0 = c[qa]; r0 < c[qa + 1]; r0 += kQueryBlock) {  // every row of q is in one branch
        const int64_t nb = std::min(kQueryBlock, c[qa + 1] - r0);
        QueryGrad g(q[b].narrow(0, r0, nb).narrow(1, h0, G), gi, b, r0, nb, h0, G, Tensor(), s.scale, acc);
        g.run(ranges, kg);
        dq[b].narrow(0, r0, nb).narrow(1, h0, G).copy_(g.dq_rows());
      }
    }
    dk[b].narrow(1, hk, 1).copy_(kg.dk[0].permute({1, 0, 2}));
    dv[b].narrow(1, hk, 1).copy_(kg.dv[0].permute({1, 0, 2}));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("multi_kv_attention", &multi_kv_attention_cpu);
  m.impl("multi_kv_attention_backward", &multi_kv_attention_backward_cpu);
  m.impl("multi_kv_attention_out", &multi_kv_attention_out_cpu);
  m.impl("segment_attention", &segment_attention_cpu);
  m.impl("segment_attention_backward", &segment_attention_backward_cpu);
}

}  // namespace dtk::sparse
