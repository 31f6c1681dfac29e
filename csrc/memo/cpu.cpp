// CPU kernels of MEMO's memory linear attention, registered for the CPU key, and its backward: the
// forward's few batched GEMMs differentiated by hand, in opmath, with ATen ops only, so the same code
// serves CPU and CUDA tensors (registered CompositeExplicitAutograd; the GEMMs are (S ~ 16) x D x Dv
// per (batch, head), where cuBLAS' batched GEMM is the kernel).
#include "common/checks.h"
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

namespace dtk::memo {
namespace {

using at::Tensor;

at::ScalarType acc_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_memory(const std::optional<Tensor>& mem_kv, const std::optional<Tensor>& mem_z, int64_t B, int64_t H,
                  int64_t D, int64_t Dv, const char* op, at::Device device = at::kCPU) {
  TORCH_CHECK_VALUE(mem_kv.has_value() == mem_z.has_value(), op, ": mem_kv and mem_z must be given together");
  if (!mem_kv) return;
  check_floating_on(*mem_kv, op, "mem_kv", device);
  check_floating_on(*mem_z, op, "mem_z", device);
  TORCH_CHECK_VALUE(mem_kv->dim() == 4 && mem_kv->size(0) == B && mem_kv->size(1) == H && mem_kv->size(2) == D &&
                  mem_kv->size(3) == Dv,
              op, ": mem_kv must be (B, H, D, Dv) = (", B, ", ", H, ", ", D, ", ", Dv, "), got ", mem_kv->sizes());
  TORCH_CHECK_VALUE(mem_z->dim() == 3 && mem_z->size(0) == B && mem_z->size(1) == H && mem_z->size(2) == D, op,
              ": mem_z must be (B, H, D) = (", B, ", ", H, ", ", D, "), got ", mem_z->sizes());
}

// q, k, v (B, S, H, D) of one clip (same frames and heads) and its optional memory.
void check_memo(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mem_kv,
                const std::optional<Tensor>& mem_z, const char* op, at::Device device = at::kCPU) {
  check_qkv_gqa(q, k, v, op, device);
  TORCH_CHECK_VALUE(k.size(2) == q.size(2), op, ": q, k and v must have the same number of heads");
  TORCH_CHECK_VALUE(k.size(1) == q.size(1), op, ": q and k must have the same number of frames");
  check_memory(mem_kv, mem_z, q.size(0), q.size(2), q.size(3), v.size(3), op, device);
}

Tensor memory_linear_attention_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const std::optional<Tensor>& mem_kv, const std::optional<Tensor>& mem_z,
                                   double decay) {
  constexpr const char* op = "dtk.memory_linear_attention";
  check_memo(q, k, v, mem_kv, mem_z, op);
  const int64_t D = q.size(3);
  const auto acc = acc_type(q);
  Tensor fq = (at::softmax(q.to(acc), -1) * (1.0 / std::sqrt(static_cast<double>(D)))).permute({0, 2, 1, 3});
  Tensor fk = at::softmax(k.to(acc), 1).permute({0, 2, 3, 1});     // B,H,D,S
  Tensor va = v.to(acc).permute({0, 2, 1, 3});                      // B,H,S,Dv
  Tensor kv = at::matmul(fk, va);
  Tensor z = fk.sum(-1);
  if (mem_kv) {
    kv = kv + decay * mem_kv->to(acc);
    z = z + decay * mem_z->to(acc);
  }
  Tensor out = at::matmul(fq, kv) / at::matmul(fq, z.unsqueeze(-1)).clamp_min(1e-10);
  return out.permute({0, 2, 1, 3}).to(q.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor> memory_linear_attention_update_cpu(const Tensor& k, const Tensor& v,
                                                              const std::optional<Tensor>& mem_kv,
                                                              const std::optional<Tensor>& mem_z, double decay) {
  constexpr const char* op = "dtk.memory_linear_attention_update";
  check_kv_on(k, v, op, "frames", at::kCPU);
  check_memory(mem_kv, mem_z, k.size(0), k.size(2), k.size(3), v.size(3), op);
  const auto acc = acc_type(k);
  const int64_t n = k.size(1);
  // w_j = decay^(n-1-j)
  Tensor w = at::pow(at::full({}, decay, k.options().dtype(acc)),
                     at::arange(n - 1, -1, -1, k.options().dtype(acc)))
                 .view({1, n, 1, 1});
  Tensor fk = (at::softmax(k.to(acc), 1) * w).permute({0, 2, 3, 1});  // B,H,D,n
  Tensor va = (v.to(acc) * w).permute({0, 2, 1, 3});
  Tensor kv = at::matmul(fk, va);
  Tensor z = fk.sum(-1);
  if (mem_kv) {
    const double dn = std::pow(decay, static_cast<double>(n));
    kv = kv + dn * mem_kv->to(acc);
    z = z + dn * mem_z->to(acc);
  }
  return {kv.contiguous(), z.contiguous()};
}

// The CPU step is the two ops (the fusion saves GPU memory traffic); checked first so that errors
// name this op.
std::tuple<Tensor, Tensor, Tensor> memory_linear_attention_step_cpu(const Tensor& q, const Tensor& k,
                                                                    const Tensor& v,
                                                                    const std::optional<Tensor>& mem_kv,
                                                                    const std::optional<Tensor>& mem_z,
                                                                    double decay) {
  constexpr const char* op = "dtk.memory_linear_attention_step";
  check_memo(q, k, v, mem_kv, mem_z, op);
  TORCH_CHECK_VALUE(decay >= 0 && decay <= 1, op, ": decay must be in [0, 1], got ", decay);
  auto [kv, z] = memory_linear_attention_update_cpu(k, v, mem_kv, mem_z, decay);
  return {memory_linear_attention_cpu(q, k, v, mem_kv, mem_z, decay), kv, z};
}

// ---------------------------------------------------------------- backward (any device)

// Gradient of x = softmax(logits, dim) given y = softmax and dy: y * (dy - sum(y * dy)).
Tensor softmax_grad(const Tensor& y, const Tensor& dy, int64_t dim) { return y * (dy - (y * dy).sum(dim, true)); }

Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> memory_linear_attention_backward_any(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mem_kv,
    const std::optional<Tensor>& mem_z, double decay) {
  constexpr const char* op = "dtk.memory_linear_attention_backward";
  check_memo(q, k, v, mem_kv, mem_z, op, q.device());
  check_bshd_on(grad_out, op, "grad_out", q.device());
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), v.size(3)}), op,
              ": grad_out must be the output's shape (B, S, H, Dv), got ", grad_out.sizes());
  const int64_t D = q.size(3);
  const auto acc = acc_type(q);
  const double rs = 1.0 / std::sqrt(static_cast<double>(D));
  // Recompute the forward in (B, H, S, .) layout.
  Tensor sq = at::softmax(q.to(acc), -1).permute({0, 2, 1, 3});   // B,H,S,D
  Tensor fq = sq * rs;
  Tensor fk = at::softmax(k.to(acc), 1).permute({0, 2, 1, 3});    // B,H,S,D
  Tensor va = v.to(acc).permute({0, 2, 1, 3});                     // B,H,S,Dv
  Tensor kv = at::matmul(fk.transpose(-1, -2), va);                // B,H,D,Dv
  Tensor z = fk.sum(2);                                            // B,H,D
  if (mem_kv) {
    kv = kv + decay * mem_kv->to(acc);
    z = z + decay * mem_z->to(acc);
  }
  Tensor den_raw = at::matmul(fq, z.unsqueeze(-1)).squeeze(-1);    // B,H,S
  Tensor den = den_raw.clamp_min(1e-10);
  Tensor g = grad_out.to(acc).permute({0, 2, 1, 3});               // B,H,S,Dv
  Tensor out = at::matmul(fq, kv) / den.unsqueeze(-1);
  // o = num / den: dnum = g / den; dden = -(g . o) / den where the clamp passes the gradient.
  Tensor dnum = g / den.unsqueeze(-1);
  Tensor dden = -(g * out).sum(-1) / den * (den_raw >= 1e-10).to(acc);
  Tensor dfq = at::matmul(dnum, kv.transpose(-1, -2)) + dden.unsqueeze(-1) * z.unsqueeze(2);
  Tensor dkv = at::matmul(fq.transpose(-1, -2), dnum);             // B,H,D,Dv
  Tensor dz = at::matmul(fq.transpose(-1, -2), dden.unsqueeze(-1)).squeeze(-1);  // B,H,D
  Tensor dv = at::matmul(fk, dkv);                                 // B,H,S,Dv
  Tensor dfk = at::matmul(va, dkv.transpose(-1, -2)) + dz.unsqueeze(2);
  Tensor dq = softmax_grad(sq, dfq * rs, -1);
  Tensor dk = softmax_grad(fk, dfk, 2);
  const auto back = [](const Tensor& t, const Tensor& like) {
    return t.permute({0, 2, 1, 3}).to(like.scalar_type()).contiguous();
  };
  Tensor dmkv = mem_kv ? (decay * dkv).to(mem_kv->scalar_type()).contiguous() : empty_grad(q);
  Tensor dmz = mem_z ? (decay * dz).to(mem_z->scalar_type()).contiguous() : empty_grad(q);
  return {back(dq, q), back(dk, k), back(dv, v), dmkv, dmz};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> memory_linear_attention_update_backward_any(
    const std::optional<Tensor>& grad_kv, const std::optional<Tensor>& grad_z, const Tensor& k, const Tensor& v,
    const std::optional<Tensor>& mem_kv, const std::optional<Tensor>& mem_z, double decay) {
  constexpr const char* op = "dtk.memory_linear_attention_update_backward";
  check_kv_on(k, v, op, "frames", k.device());
  const int64_t B = k.size(0), n = k.size(1), H = k.size(2), D = k.size(3), Dv = v.size(3);
  check_memory(mem_kv, mem_z, B, H, D, Dv, op, k.device());
  const auto acc = acc_type(k);
  if (grad_kv) {
    check_floating_on(*grad_kv, op, "grad_kv", k.device());
    TORCH_CHECK_VALUE(grad_kv->sizes() == at::IntArrayRef({B, H, D, Dv}), op, ": grad_kv must be (B, H, D, Dv) = (", B,
                ", ", H, ", ", D, ", ", Dv, "), got ", grad_kv->sizes());
  }
  if (grad_z) {
    check_floating_on(*grad_z, op, "grad_z", k.device());
    TORCH_CHECK_VALUE(grad_z->sizes() == at::IntArrayRef({B, H, D}), op, ": grad_z must be (B, H, D) = (", B, ", ", H,
                ", ", D, "), got ", grad_z->sizes());
  }
  Tensor gkv = grad_kv ? grad_kv->to(acc) : at::zeros({B, H, D, Dv}, k.options().dtype(acc));
  Tensor gz = grad_z ? grad_z->to(acc) : at::zeros({B, H, D}, k.options().dtype(acc));
  Tensor w = at::pow(at::full({}, decay, k.options().dtype(acc)), at::arange(n - 1, -1, -1, k.options().dtype(acc)))
                 .view({1, 1, n, 1});
  Tensor fk = at::softmax(k.to(acc), 1).permute({0, 2, 1, 3});     // B,H,n,D
  Tensor va = v.to(acc).permute({0, 2, 1, 3});                      // B,H,n,Dv
  // kv = sum_j (w_j fk_j)(w_j v_j)^T, z = sum_j w_j fk_j
  Tensor dv = at::matmul(fk * w, gkv) * w;
  Tensor dfk = (at::matmul(va * w, gkv.transpose(-1, -2)) + gz.unsqueeze(2)) * w;
  Tensor dk = softmax_grad(fk, dfk, 2);
  const double dn = std::pow(decay, static_cast<double>(n));
  Tensor dmkv = mem_kv ? (dn * gkv).to(mem_kv->scalar_type()).contiguous() : empty_grad(k);
  Tensor dmz = mem_z ? (dn * gz).to(mem_z->scalar_type()).contiguous() : empty_grad(k);
  return {dk.permute({0, 2, 1, 3}).to(k.scalar_type()).contiguous(),
          dv.permute({0, 2, 1, 3}).to(v.scalar_type()).contiguous(), dmkv, dmz};
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CompositeExplicitAutograd, m) {
  m.impl("memory_linear_attention_backward", &memory_linear_attention_backward_any);
  m.impl("memory_linear_attention_update_backward", &memory_linear_attention_update_backward_any);
}

TORCH_LIBRARY_IMPL(dtk, CPU, m) {
  m.impl("memory_linear_attention", &memory_linear_attention_cpu);
  m.impl("memory_linear_attention_update", &memory_linear_attention_update_cpu);
  m.impl("memory_linear_attention_step", &memory_linear_attention_step_cpu);
}

}  // namespace dtk::memo
