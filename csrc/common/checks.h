// Argument checks shared by every op family. Every message names the argument at fault and
// says what was expected. Value errors raise ValueError, dtype errors TypeError (from Python).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/layout.h"

namespace dtk {

// grid: 1..3 sizes >= 1. Returns the grid padded to 3 axes with leading 1s.
inline std::array<int64_t, 3> check_grid(at::IntArrayRef grid) {
  TORCH_CHECK_VALUE(grid.size() >= 1 && grid.size() <= 3,
                    "grid must be 1, 2 or 3 ints (L), (H, W) or (T, H, W), got ", grid.size(), " values ", grid);
  std::array<int64_t, 3> g{1, 1, 1};
  const size_t pad = 3 - grid.size();
  for (size_t a = 0; a < grid.size(); ++a) {
    TORCH_CHECK_VALUE(grid[a] >= 1, "grid sizes must be >= 1, got grid=", grid);
    g[pad + a] = grid[a];
  }
  return g;
}

inline void check_num_prefix(int64_t num_prefix) {
  TORCH_CHECK_VALUE(num_prefix >= 0, "num_prefix must be >= 0, got ", num_prefix);
}

// The sequence length must be num_prefix + prod(grid) (overflow-safe).
inline void check_grid_matches_seq(at::IntArrayRef grid, const std::array<int64_t, 3>& g, int64_t num_prefix,
                                   int64_t seq_len, const char* seq_name) {
  const int64_t avail = seq_len - num_prefix;
  TORCH_CHECK_VALUE(avail >= 1, "num_prefix (", num_prefix, ") must leave grid tokens in the sequence: ", seq_name,
                    " = ", seq_len, " but num_prefix + prod(grid) with grid=", grid, " needs more");
  bool ok = true;
  int64_t prod = 1;
  for (int64_t n : g) {
    if (n > avail / prod) { ok = false; break; }
    prod *= n;
  }
  TORCH_CHECK_VALUE(ok && prod == avail, "grid=", grid, " does not match the sequence length: expected ", seq_name,
                    " = num_prefix + prod(grid) but ", seq_name, " = ", seq_len, ", num_prefix = ", num_prefix);
}

// tile: one size >= 1 per grid axis. Returns the layout (tile padded with 1s, clipped to the grid).
inline TileLayout check_tile(at::OptionalIntArrayRef tile, at::IntArrayRef grid, const std::array<int64_t, 3>& g) {
  TileLayout layout{g[0], g[1], g[2], g[0], g[1], g[2]};
  if (!tile.has_value()) return layout;
  const at::IntArrayRef t = tile.value();
  TORCH_CHECK_VALUE(t.size() == grid.size(), "tile must have one size per grid axis (", grid.size(), " for grid=", grid,
                    "), got tile=", t);
  std::array<int64_t, 3> u{1, 1, 1};
  const size_t pad = 3 - t.size();
  for (size_t a = 0; a < t.size(); ++a) {
    TORCH_CHECK_VALUE(t[a] >= 1, "tile sizes must be >= 1, got tile=", t);
    u[pad + a] = std::min(t[a], g[pad + a]);
  }
  layout.u0 = u[0];
  layout.u1 = u[1];
  layout.u2 = u[2];
  return layout;
}

// A (B, S, H, D) tensor: 4-D with a contiguous last dim (any strides on B, S, H).
inline void check_bshd(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must be a 4-D (batch, seq, heads, head_dim) tensor, got ", t.dim(),
                    "-D with shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(3) >= 1, name, " must have a head dim >= 1, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(2) >= 1, name, " must have at least one head, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(3) == 1 || t.size(3) == 1, name,
                    " must have a contiguous last (head_dim) dim (stride 1), got strides ", t.strides(),
                    "; any strides on batch, seq and heads are fine");
}

// check_bshd, and a floating tensor with q's dtype (TypeError) on q's device (ValueError).
inline void check_bshd_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_bshd(t, name);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected q's dtype ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), ", expected q's device ", q.device());
}

// An index argument: an int32 or int64 tensor (TypeError) on q's device (ValueError).
inline void check_index_tensor(const at::Tensor& idx, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, name,
                   " must be an int32 or int64 tensor, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == q.device(), name, " is on ", idx.device(), ", expected q's device ", q.device());
}

// Index values in [0, limit) or -1 (padding), else IndexError with the range found.
inline void check_index_range(const at::Tensor& idx, int64_t limit, const char* name) {
  if (idx.numel() == 0) return;
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK_INDEX(lo >= -1 && hi < limit, name, " out of range: entries must be in [0, ", limit,
                    ") or -1 (padding), got values in [", lo, ", ", hi, "]");
}

// An attention backward's saved output and gradients: out and grad_out (B, n, H, D) like q with the
// forward output's n rows; lse and grad_lse (B, H, n) float32 on q's device (grad_lse may be
// undefined: no gradient of the lse).
inline void check_grads(const at::Tensor& grad_out, const at::Tensor& grad_lse, const at::Tensor& out,
                        const at::Tensor& lse, const at::Tensor& q, int64_t n) {
  const std::array<int64_t, 4> out_shape{q.size(0), n, q.size(2), q.size(3)};
  const std::array<int64_t, 3> lse_shape{q.size(0), q.size(2), n};
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_bshd_like(*t, name, q);
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(out_shape), name, " must have the forward output's shape ",
                      at::IntArrayRef(out_shape), ", got ", t->sizes());
  }
  for (const auto& [t, name] : {std::pair{&lse, "lse"}, std::pair{&grad_lse, "grad_lse"}}) {
    if (!t->defined()) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), name, " is on ", t->device(), ", expected q's device ", q.device());
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape), name, " must be (B, H, n) = ",
                      at::IntArrayRef(lse_shape), ", got ", t->sizes());
  }
}

// Runs checks() (the checks of one op call); an error keeps its type (TypeError, ValueError, ...)
// and its message gets the op's name, "... (in dtk.multi_kv_attention)".
template <typename F>
decltype(auto) checks_of(const char* op, F&& checks) {
  try {
    return checks();
  } catch (c10::Error& e) {
    e.add_context(std::string("in ") + op);
    throw;
  }
}

// Same dtype and device as a reference tensor.
inline void check_same_dtype_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (", ref.device(),
              "), got ", t.device());
}

inline void check_attention_dtype(const at::Tensor& t, const char* name, bool allow_double) {
  const auto st = t.scalar_type();
  const bool ok = st == at::kHalf || st == at::kBFloat16 || st == at::kFloat || (allow_double && st == at::kDouble);
  TORCH_CHECK_TYPE(ok, name, " must be float16, bfloat16, float32", allow_double ? " or float64" : "",
                   ", got ", st);
}

inline double check_scale(std::optional<double> scale, int64_t head_dim) {
  if (!scale.has_value()) return 1.0 / std::sqrt(static_cast<double>(head_dim));
  TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0, "scale must be a finite float > 0, got ", *scale);
  return *scale;
}

// q (B,S,H,D), k/v (B,Skv,H_kv,D) with H % H_kv == 0, and optional extra_k/extra_v (B,E,H_kv,D),
// given together. Same dtype and device throughout. Set same_seq when k must have q's length.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::optional<at::Tensor>& extra_k, const std::optional<at::Tensor>& extra_v,
                      bool allow_double, bool same_seq) {
  check_bshd(q, "q");
  check_bshd(k, "k");
  check_bshd(v, "v");
  check_attention_dtype(q, "q", allow_double);
  check_same_dtype_device(k, "k", q, "q");
  check_same_dtype_device(v, "v", q, "q");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "q, k and v must have the same batch size, got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(!same_seq || k.size(1) == q.size(1), "k must have the sequence length of q (", q.size(1),
                    "), got k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(1) == k.size(1), "v must have the sequence length of k (", k.size(1), "), got v ", v.sizes());
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), "v must have the number of heads of k (", k.size(2), "), got v ", v.sizes());
  TORCH_CHECK_VALUE(q.size(2) % k.size(2) == 0, "the number of q heads (", q.size(2),
                    ") must be a multiple of the number of k/v heads (", k.size(2), ") for GQA");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && v.size(3) == q.size(3),
                    "q, k and v must have the same head dim, got q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(extra_k.has_value() == extra_v.has_value(),
                    "extra_k and extra_v must be given together, got only ", extra_k.has_value() ? "extra_k" : "extra_v");
  if (!extra_k.has_value()) return;
  const at::Tensor& ek = *extra_k;
  const at::Tensor& ev = *extra_v;
  check_bshd(ek, "extra_k");
  check_bshd(ev, "extra_v");
  check_same_dtype_device(ek, "extra_k", q, "q");
  check_same_dtype_device(ev, "extra_v", q, "q");
  TORCH_CHECK_VALUE(ek.size(0) == q.size(0) && ek.size(2) == k.size(2) && ek.size(3) == q.size(3),
                    "extra_k must be (batch, num_extra, kv_heads, head_dim) = (", q.size(0), ", E, ", k.size(2), ", ",
                    q.size(3), "), got ", ek.sizes());
  TORCH_CHECK_VALUE(ev.sizes() == ek.sizes(), "extra_v must have the shape of extra_k ", ek.sizes(), ", got ", ev.sizes());
}


// ---- the linear-attention families (csrc/linear, csrc/memo). Messages start with the op.

// A floating tensor on `device`: the CPU for the CPU kernels; the first input's device for the
// any-device kernels (the MEMO backward), which the dispatcher also sends mixed CPU / CUDA arguments.
inline void check_floating_on(const at::Tensor& t, const char* op, const char* name, at::Device device) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  if (device.is_cpu()) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU for this kernel, got ", t.device());
  } else {
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be on ", device, " with the other inputs, got ", t.device());
  }
}

// A (B, S, H, D) floating tensor on `device`, any strides (the linear families' CPU kernels are ATen ops).
inline void check_bshd_on(const at::Tensor& t, const char* op, const char* name, at::Device device) {
  check_floating_on(t, op, name, device);
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " must be (B, S, H, D), got shape ", t.sizes());
}

// q (B, Sq, H, D), k (B, Sk, H_kv, D), v (B, Sk, H_kv, Dv) on `device`: one dtype, one batch, k with
// q's head dim, v matching k in length and heads, H a multiple of H_kv (GQA).
inline void check_qkv_gqa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
                          at::Device device) {
  check_bshd_on(q, op, "q", device);
  check_bshd_on(k, op, "k", device);
  check_bshd_on(v, op, "v", device);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": q, k and v must have the same batch size");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), op, ": k must have q's head dim ", q.size(3), ", got ", k.size(3));
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(2) == k.size(2), op,
              ": v must match k in sequence length and heads, got v ", v.sizes(), " and k ", k.sizes());
  TORCH_CHECK_VALUE(k.size(2) > 0 && q.size(2) % k.size(2) == 0, op, ": the heads of q (", q.size(2),
              ") must be a multiple of the heads of k (", k.size(2), ")");
}

// k (B, S, H, D) and v (B, S, H, Dv) on `device` with one dtype, matching in B, S (`seq`) and H.
inline void check_kv_on(const at::Tensor& k, const at::Tensor& v, const char* op, const char* seq, at::Device device) {
  check_bshd_on(k, op, "k", device);
  check_bshd_on(v, op, "v", device);
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), op, ": k and v must share a dtype");
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must match k in batch, ",
              seq, " and heads, got v ", v.sizes(), " and k ", k.sizes());
}

// A FlashAttention packing `name` (int32, (num_seqs + 1,)) of a packed length `total`: 0 first,
// non-decreasing, `total` last. Returns each sequence's [start, end).
inline std::vector<std::pair<int64_t, int64_t>> check_cu_seqlens(const at::Tensor& cu, int64_t total, const char* op,
                                                                 const char* name) {
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2, op, ": ", name, " must be 1-D with at least 2 entries, got shape ",
              cu.sizes());
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", cu.scalar_type());
  at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t n = c.numel();
  TORCH_CHECK_VALUE(p[0] == 0, op, ": ", name, " must start at 0, got ", p[0]);
  std::vector<std::pair<int64_t, int64_t>> out;
  out.reserve(n - 1);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(p[i] >= p[i - 1], op, ": ", name, " must be non-decreasing, got ", p[i - 1], " then ", p[i],
                " at index ", i);
    out.emplace_back(p[i - 1], p[i]);
  }
  TORCH_CHECK_VALUE(p[n - 1] == total, op, ": ", name, " must end at the packed length ", total, ", got ", p[n - 1]);
  return out;
}

}  // namespace dtk
