// CPU kernels of the linear-attention family (LinFusion), registered for the CPU key (MEMO's are in
// csrc/memo/cpu.cpp).
//
// Every op is "state reduction, then apply": the state phi(k)^T v (D x Dv) and sum phi(k) (D) are
// accumulated per (sequence, kv head) with batched GEMMs in float32 (float64 for float64 inputs),
// then each query row reads it. Packed sequences (cu_seqlens for q, cu_seqlens_k for k and v when
// they are packed apart) are processed one at a time.
#include "common/checks.h"
#include "common/debug.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>
#include <vector>

namespace dtk::linear {
namespace {

using at::Tensor;

enum class FeatureMap { Elu1, Relu, Identity };

FeatureMap parse_feature_map(std::string_view s, const char* op) {
  if (s == "elu1") return FeatureMap::Elu1;
  if (s == "relu") return FeatureMap::Relu;
  if (s == "identity") return FeatureMap::Identity;
  TORCH_CHECK_VALUE(false, op, ": feature_map must be one of 'elu1', 'relu', 'identity', got '", s, "'");
}

Tensor phi(const Tensor& x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::Elu1: return at::elu(x) + 1;
    case FeatureMap::Relu: return at::relu(x);
    default: return x;
  }
}

// d phi / dx evaluated at x.
Tensor phi_grad(const Tensor& x, FeatureMap fm) {
  switch (fm) {
    case FeatureMap::Elu1: return at::where(x > 0, at::ones_like(x), at::exp(at::clamp_max(x, 0)));
    case FeatureMap::Relu: return (x > 0).to(x.scalar_type());
    default: return at::ones_like(x);
  }
}

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}


using dtk::new_output;  // NaN-filled under DTK_DEBUG_NAN_FILL=1 (common/debug.h)

using Bounds = std::vector<std::pair<int64_t, int64_t>>;

// Bounds of each packed sequence's queries (cu_seqlens over q) and keys (cu_seqlens_k over k, or
// cu_seqlens when q and k share the packing, whose equal lengths check_linear_inputs has checked).
std::pair<Bounds, Bounds> packed_bounds(const Tensor& cu, const std::optional<Tensor>& cu_k, int64_t total_q,
                                        int64_t total_k, const char* op) {
  Bounds qb = check_cu_seqlens(cu, total_q, op, "cu_seqlens");
  if (!cu_k) return {qb, qb};
  Bounds kb = check_cu_seqlens(*cu_k, total_k, op, "cu_seqlens_k");
  TORCH_CHECK_VALUE(kb.size() == qb.size(), op, ": cu_seqlens_k must describe as many sequences as cu_seqlens (",
              qb.size(), "), got ", kb.size());
  return {std::move(qb), std::move(kb)};
}

Tensor expand_heads(const Tensor& t, int64_t H) {  // t (B, Hkv, ...) -> (B, H, ...)
  const int64_t Hkv = t.size(1);
  return Hkv == H ? t : t.repeat_interleave(H / Hkv, 1);
}

// ---- dense (one batch of equal-length sequences) building blocks, in the accumulation dtype ----

// k (B,S,Hkv,D), v (B,S,Hkv,Dv) -> kv (B,Hkv,D,Dv), ksum (B,Hkv,D)
std::pair<Tensor, Tensor> state_dense(const Tensor& k, const Tensor& v, FeatureMap fm, at::ScalarType acc) {
  Tensor fk = phi(k.to(acc), fm).permute({0, 2, 3, 1});   // B,Hkv,D,S
  Tensor va = v.to(acc).permute({0, 2, 1, 3});             // B,Hkv,S,Dv
  return {at::matmul(fk, va), fk.sum(-1)};
}

// q (B,Sq,H,D) against state -> out (B,Sq,H,Dv) in acc
Tensor apply_dense(const Tensor& q, const Tensor& kv, const Tensor& ksum, const Tensor& count, FeatureMap fm,
                   bool normalize, double eps, std::optional<double> scale, at::ScalarType acc) {
  const int64_t B = q.size(0), H = q.size(2);
  Tensor qa = q.to(acc);
  if (scale) qa = qa * *scale;
  Tensor fq = phi(qa, fm).permute({0, 2, 1, 3});           // B,H,Sq,D
  Tensor kvh = expand_heads(kv.to(acc), H);
  Tensor out;
  if (!normalize) {
    out = at::matmul(fq, kvh);
  } else {
    Tensor n = count.to(at::kCPU).clamp_min(1).to(acc).view({B, 1, 1, 1});
    Tensor sn = kvh / n;                                   // S = (1/N) sum phi(k) v^T
    Tensor zn = expand_heads(ksum.to(acc), H).unsqueeze(-1) / n;  // mean phi(k), (B,H,D,1)
    out = at::matmul(fq, sn) / (at::matmul(fq, zn) + eps);
  }
  return out.permute({0, 2, 1, 3});
}

// Gradients of apply_dense(q, state_dense(k, v)) -> (dq, dk, dv) in acc, (B,S,H,D) layouts.
std::tuple<Tensor, Tensor, Tensor> backward_dense(const Tensor& g, const Tensor& q, const Tensor& k, const Tensor& v,
                                                  FeatureMap fm, bool normalize, double eps,
                                                  std::optional<double> scale, at::ScalarType acc) {
  const int64_t B = q.size(0), H = q.size(2), Hkv = k.size(2), G = H / Hkv, D = q.size(3), Dv = v.size(3);
  const int64_t N = std::max<int64_t>(k.size(1), 1);
  Tensor qs = q.to(acc);
  if (scale) qs = qs * *scale;
  Tensor ka = k.to(acc);
  Tensor fq = phi(qs, fm).permute({0, 2, 1, 3});           // B,H,Sq,D
  Tensor fk = phi(ka, fm).permute({0, 2, 1, 3});           // B,Hkv,Sk,D
  Tensor va = v.to(acc).permute({0, 2, 1, 3});             // B,Hkv,Sk,Dv
  Tensor gg = g.to(acc).permute({0, 2, 1, 3});             // B,H,Sq,Dv
  Tensor kv = at::matmul(fk.transpose(-1, -2), va);        // B,Hkv,D,Dv
  Tensor kvh = expand_heads(kv, H);
  Tensor gfq, gS, gz;
  if (normalize) {
    Tensor sn = kvh / static_cast<double>(N);
    Tensor zn = expand_heads(fk.sum(2), H).unsqueeze(-1) / static_cast<double>(N);  // B,H,D,1
    Tensor den = at::matmul(fq, zn) + eps;                 // B,H,Sq,1
    Tensor o = at::matmul(fq, sn) / den;
    Tensor ga = gg / den;
    Tensor gd = -(gg * o).sum(-1, true) / den;             // B,H,Sq,1
    gfq = at::matmul(ga, sn.transpose(-1, -2)) + gd * zn.transpose(-1, -2);
    gS = at::matmul(fq.transpose(-1, -2), ga) / static_cast<double>(N);   // B,H,D,Dv
    gz = (fq * gd).sum(2) / static_cast<double>(N);                       // B,H,D
  } else {
    gfq = at::matmul(gg, kvh.transpose(-1, -2));
    gS = at::matmul(fq.transpose(-1, -2), gg);
  }
  if (G > 1) {
    gS = gS.view({B, Hkv, G, D, Dv}).sum(2);
    if (gz.defined()) gz = gz.view({B, Hkv, G, D}).sum(2);
  }
  Tensor gfk = at::matmul(va, gS.transpose(-1, -2));      // B,Hkv,Sk,D
  if (gz.defined()) gfk = gfk + gz.unsqueeze(2);
  Tensor gv = at::matmul(fk, gS);                          // B,Hkv,Sk,Dv
  Tensor dq = gfq.permute({0, 2, 1, 3}) * phi_grad(qs, fm);
  if (scale) dq = dq * *scale;
  Tensor dk = gfk.permute({0, 2, 1, 3}) * phi_grad(ka, fm);
  return {dq, dk, gv.permute({0, 2, 1, 3})};
}

// The inputs of linear_attention[_backward]: q, k, v (GQA) on the CPU and their packings (cu_seqlens
// packs q, and k and v too unless cu_seqlens_k packs them).
void check_linear_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu,
                         const std::optional<Tensor>& cu_k, const char* op) {
  check_qkv_gqa(q, k, v, op, at::kCPU);
  TORCH_CHECK_VALUE(!cu_k || cu, op, ": cu_seqlens_k (the packing of k and v) needs cu_seqlens (the packing of q)");
  if (cu) {
    TORCH_CHECK_VALUE(q.size(0) == 1, op, ": with cu_seqlens, q, k and v must be packed as (1, total, H, D)");
    TORCH_CHECK_VALUE(cu_k || k.size(1) == q.size(1), op,
                ": with cu_seqlens alone, q and k share the packing and must have the same length (pass "
                "cu_seqlens_k to pack k and v apart), got ", q.size(1), " and ", k.size(1));
  }
}

// ---------------------------------------------------------------- ops

Tensor linear_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v, std::string_view feature_map,
                            bool normalize, double eps, std::optional<double> scale,
                            const std::optional<Tensor>& cu_seqlens, const std::optional<Tensor>& cu_seqlens_k) {
  constexpr const char* op = "dtk.linear_attention";
  const FeatureMap fm = parse_feature_map(feature_map, op);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  check_linear_inputs(q, k, v, cu_seqlens, cu_seqlens_k, op);
  const auto acc = acc_type(q);
  if (!cu_seqlens) {
    auto [kv, ks] = state_dense(k, v, fm, acc);
    Tensor count = at::full({q.size(0)}, k.size(1), q.options().dtype(at::kLong));
    return apply_dense(q, kv, ks, count, fm, normalize, eps, scale, acc).to(q.scalar_type()).contiguous();
  }
  auto [qb, kb] = packed_bounds(*cu_seqlens, cu_seqlens_k, q.size(1), k.size(1), op);
  Tensor out = new_output({1, q.size(1), q.size(2), v.size(3)}, q.options());
  for (size_t i = 0; i < qb.size(); ++i) {
    auto [q0, q1] = qb[i];
    auto [k0, k1] = kb[i];
    if (q1 == q0) continue;
    // No keys: the state is zero and count 0 (read as 1), so the rows are 0, as in the reference.
    auto [kv, ks] = state_dense(k.narrow(1, k0, k1 - k0), v.narrow(1, k0, k1 - k0), fm, acc);
    Tensor count = at::full({1}, k1 - k0, q.options().dtype(at::kLong));
    out.narrow(1, q0, q1 - q0)
        .copy_(apply_dense(q.narrow(1, q0, q1 - q0), kv, ks, count, fm, normalize, eps, scale, acc));
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_attention_backward_cpu(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, std::string_view feature_map,
    bool normalize, double eps, std::optional<double> scale, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& cu_seqlens_k) {
  constexpr const char* op = "dtk.linear_attention_backward";
  const FeatureMap fm = parse_feature_map(feature_map, op);
  check_linear_inputs(q, k, v, cu_seqlens, cu_seqlens_k, op);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == q.size(0) && grad_out.size(1) == q.size(1) &&
                  grad_out.size(2) == q.size(2) && grad_out.size(3) == v.size(3),
              op, ": grad_out must have the output's shape");
  const auto acc = acc_type(q);
  if (!cu_seqlens) {
    auto [dq, dk, dv] = backward_dense(grad_out, q, k, v, fm, normalize, eps, scale, acc);
    return {dq.to(q.scalar_type()).contiguous(), dk.to(k.scalar_type()).contiguous(), dv.to(v.scalar_type()).contiguous()};
  }
  auto [qb, kb] = packed_bounds(*cu_seqlens, cu_seqlens_k, q.size(1), k.size(1), op);
  Tensor dq = at::zeros(q.sizes(), q.options());
  Tensor dk = at::zeros(k.sizes(), k.options());
  Tensor dv = at::zeros(v.sizes(), v.options());
  for (size_t i = 0; i < qb.size(); ++i) {
    auto [q0, q1] = qb[i];
    auto [k0, k1] = kb[i];
    // No queries or no keys: the output does not depend on the sequence's inputs (no rows, or a
    // zero state), so their gradients stay 0.
    if (q1 == q0 || k1 == k0) continue;
    auto [a, b, c] = backward_dense(grad_out.narrow(1, q0, q1 - q0), q.narrow(1, q0, q1 - q0),
                                    k.narrow(1, k0, k1 - k0), v.narrow(1, k0, k1 - k0), fm, normalize, eps, scale, acc);
    dq.narrow(1, q0, q1 - q0).copy_(a);
    dk.narrow(1, k0, k1 - k0).copy_(b);
    dv.narrow(1, k0, k1 - k0).copy_(c);
  }
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> linear_attention_state_cpu(const Tensor& k, const Tensor& v,
                                                              std::string_view feature_map,
                                                              const std::optional<Tensor>& cu_seqlens) {
  constexpr const char* op = "dtk.linear_attention_state";
  const FeatureMap fm = parse_feature_map(feature_map, op);
  check_kv_on(k, v, op, "sequence length", at::kCPU);
  const auto acc = acc_type(k);
  if (!cu_seqlens) {
    auto [kv, ks] = state_dense(k, v, fm, acc);
    return {kv.contiguous(), ks.contiguous(), at::full({k.size(0)}, k.size(1), k.options().dtype(at::kLong))};
  }
  TORCH_CHECK_VALUE(k.size(0) == 1, op, ": with cu_seqlens, k and v must be packed as (1, total, H, D)");
  auto bounds = check_cu_seqlens(*cu_seqlens, k.size(1), op, "cu_seqlens");
  const int64_t n = static_cast<int64_t>(bounds.size()), H = k.size(2), D = k.size(3), Dv = v.size(3);
  Tensor kv = at::zeros({n, H, D, Dv}, k.options().dtype(acc));
  Tensor ks = at::zeros({n, H, D}, k.options().dtype(acc));
  Tensor count = at::empty({n}, k.options().dtype(at::kLong));
  for (int64_t i = 0; i < n; ++i) {
    auto [s, e] = bounds[i];
    count[i] = e - s;
    if (e == s) continue;
    auto [a, b] = state_dense(k.narrow(1, s, e - s), v.narrow(1, s, e - s), fm, acc);
    kv.narrow(0, i, 1).copy_(a);
    ks.narrow(0, i, 1).copy_(b);
  }
  return {kv, ks, count};
}

Tensor linear_attention_apply_cpu(const Tensor& q, const Tensor& kv_sum, const Tensor& k_sum, const Tensor& count,
                                  std::string_view feature_map, bool normalize, double eps,
                                  std::optional<double> scale, const std::optional<Tensor>& cu_seqlens) {
  constexpr const char* op = "dtk.linear_attention_apply";
  const FeatureMap fm = parse_feature_map(feature_map, op);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
  check_bshd_on(q, op, "q", at::kCPU);
  TORCH_CHECK_VALUE(kv_sum.dim() == 4 && kv_sum.size(2) == q.size(3), op,
              ": kv_sum must be (B, H_kv, D, Dv) with q's head dim, got ", kv_sum.sizes());
  const int64_t Bs = kv_sum.size(0), Hkv = kv_sum.size(1);
  TORCH_CHECK_VALUE(k_sum.dim() == 3 && k_sum.size(0) == Bs && k_sum.size(1) == Hkv && k_sum.size(2) == q.size(3), op,
              ": k_sum must be (B, H_kv, D) = ", Bs, ", ", Hkv, ", ", q.size(3), ", got ", k_sum.sizes());
  TORCH_CHECK_VALUE(count.dim() == 1 && count.size(0) == Bs, op, ": count must be (", Bs, ",), got ", count.sizes());
  TORCH_CHECK_VALUE(Hkv > 0 && q.size(2) % Hkv == 0, op, ": the heads of q (", q.size(2),
              ") must be a multiple of the state's heads (", Hkv, ")");
  const auto acc = acc_type(q);
  if (!cu_seqlens) {
    TORCH_CHECK_VALUE(Bs == q.size(0), op, ": the state's batch ", Bs, " must equal q's batch ", q.size(0));
    return apply_dense(q, kv_sum, k_sum, count, fm, normalize, eps, scale, acc).to(q.scalar_type()).contiguous();
  }
  TORCH_CHECK_VALUE(q.size(0) == 1, op, ": with cu_seqlens, q must be packed as (1, total, H, D)");
  auto bounds = check_cu_seqlens(*cu_seqlens, q.size(1), op, "cu_seqlens");
  TORCH_CHECK_VALUE(static_cast<int64_t>(bounds.size()) == Bs, op, ": cu_seqlens describes ", bounds.size(),
              " sequences but the state has ", Bs);
  Tensor out = new_output({1, q.size(1), q.size(2), kv_sum.size(3)}, q.options());
  for (int64_t i = 0; i < Bs; ++i) {
    auto [s, e] = bounds[i];
    if (e == s) continue;
    out.narrow(1, s, e - s)
        .copy_(apply_dense(q.narrow(1, s, e - s), kv_sum.narrow(0, i, 1), k_sum.narrow(0, i, 1),
                           count.narrow(0, i, 1), fm, normalize, eps, scale, acc));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("linear_attention", &linear_attention_cpu);
  m.impl("linear_attention_backward", &linear_attention_backward_cpu);
  m.impl("linear_attention_state", &linear_attention_state_cpu);
  m.impl("linear_attention_apply", &linear_attention_apply_cpu);
}

}  // namespace dtk::linear
