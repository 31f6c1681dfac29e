// Reuse (cache and token-selection) ops: SpotEdit, FreeSwim.
//
// scatter_blend: a fused one-pass CPU kernel (its GPU kernel is Triton, python/dtk/ops/reuse/triton.py).
// token_change_score, mask_to_index, dilate_mask, prune_isolated: device-generic ATen compositions
// (CompositeExplicitAutograd: the same code runs on CPU, CUDA and meta tensors). mask_to_index is
// built from cumsum + scatter only, so it never reads a value back to the host (no sync).
#include "common/checks.h"
#include "common/debug.h"
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

namespace dtk::reuse {
namespace {

using at::Tensor;


using dtk::new_output;  // NaN-filled under DTK_DEBUG_NAN_FILL=1 (common/debug.h)

// ------------------------------------------------------------------------------------ scatter_blend

Tensor scatter_blend_cpu(const Tensor& base, Tensor& cache, const Tensor& fresh, const Tensor& index, double lam,
                         const std::optional<Tensor>& lam_per_batch) {
  const char* op = "dtk.scatter_blend";
  TORCH_CHECK_VALUE(base.dim() >= 2, op, ": base must be (B, N, ...), got shape ", base.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(base.scalar_type()), op, ": base must be a floating tensor, got ", base.scalar_type());
  TORCH_CHECK_VALUE(cache.sizes() == base.sizes(), op, ": cache must have base's shape ", base.sizes(), ", got ",
              cache.sizes());
  TORCH_CHECK_TYPE(cache.scalar_type() == base.scalar_type() && fresh.scalar_type() == base.scalar_type(), op,
              ": cache and fresh must have base's dtype ", base.scalar_type(), ", got ", cache.scalar_type(), " and ",
              fresh.scalar_type());
  TORCH_CHECK_VALUE(cache.is_contiguous(), op, ": cache must be contiguous (it is updated in place)");
  const int64_t B = base.size(0), N = base.size(1);
  TORCH_CHECK_VALUE(fresh.dim() == base.dim() && fresh.size(0) == B && fresh.sizes().slice(2) == base.sizes().slice(2), op,
              ": fresh must be (B=", B, ", n", base.sizes().slice(2), "), got ", fresh.sizes());
  const int64_t n = fresh.size(1);
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
              ": index must be an int32 or int64 tensor, got ", index.scalar_type());
  TORCH_CHECK_VALUE((index.dim() == 1 && index.size(0) == n) || (index.dim() == 2 && index.size(0) == B && index.size(1) == n),
              op, ": index must be (n=", n, ",) or (B=", B, ", n=", n, ") to match fresh, got ", index.sizes());
  TORCH_CHECK_VALUE(std::isfinite(lam), op, ": lam must be finite, got ", lam);
  Tensor lam_t;
  if (lam_per_batch.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(lam_per_batch->scalar_type()), op, ": lam must be a float or a floating tensor, got ",
                lam_per_batch->scalar_type());
    TORCH_CHECK_VALUE(lam_per_batch->numel() == B, op, ": a lam tensor must hold one value per batch (B=", B, "), got shape ",
                lam_per_batch->sizes());
    lam_t = lam_per_batch->to(at::kCPU, at::kDouble).reshape({B}).contiguous();
  }
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{cache, "cache"}, {fresh, "fresh"}, {index, "index"}})
    TORCH_CHECK_VALUE(t.device() == base.device(), op, ": ", name, " is on ", t.device(), ", expected base's device ",
                base.device());
  Tensor idx = (index.dim() == 1 ? index.unsqueeze(0).expand({B, n}) : index).to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> pos(B * N, -1);  // row -> fresh row
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = ip[b * n + j];
      if (r == -1) continue;  // padding
      TORCH_CHECK_INDEX(r >= 0 && r < N, op, ": index out of range: entries must be in [0, ", N, ") or -1, got ", r);
      TORCH_CHECK_VALUE(pos[b * N + r] < 0, op, ": index has duplicate entry ", r, " (batch ", b, ")");
      pos[b * N + r] = j;
    }
  Tensor bc = base.contiguous(), fc = fresh.contiguous();
  Tensor out = new_output(base.sizes(), base.options());
  const int64_t C = B * N == 0 ? 0 : base.numel() / (B * N);
  const double* lp = lam_t.defined() ? lam_t.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "scatter_blend", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    const scalar_t* fp = fc.data_ptr<scalar_t>();
    scalar_t* cp = cache.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * N, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / N;
        const int64_t j = pos[r];
        scalar_t* orow = op_ + r * C;
        scalar_t* crow = cp + r * C;
        if (j >= 0) {
          const scalar_t* frow = fp + (b * n + j) * C;
          for (int64_t c = 0; c < C; ++c) orow[c] = crow[c] = frow[c];
        } else {
          const opmath l = static_cast<opmath>(lp ? lp[b] : lam);
          const scalar_t* brow = bp + r * C;
          for (int64_t c = 0; c < C; ++c)
            orow[c] = static_cast<scalar_t>((1 - l) * static_cast<opmath>(brow[c]) + l * static_cast<opmath>(crow[c]));
        }
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------ token selection

Tensor token_change_score(at::TensorList features, at::TensorList reference, int64_t pool,
                          at::OptionalIntArrayRef size) {
  const char* op = "dtk.token_change_score";
  TORCH_CHECK_VALUE(!features.empty(), op, ": features must hold at least one (B, C, h, w) feature map");
  TORCH_CHECK_VALUE(features.size() == reference.size(), op, ": features and reference must have the same length, got ",
              features.size(), " and ", reference.size());
  TORCH_CHECK_VALUE(pool >= 1, op, ": pool must be >= 1, got ", pool);
  const int64_t B = features[0].dim() == 4 ? features[0].size(0) : -1;
  for (size_t i = 0; i < features.size(); ++i) {
    const Tensor& f = features[i];
    const Tensor& r = reference[i];
    TORCH_CHECK_VALUE(f.dim() == 4 && f.size(0) == B, op, ": features[", i, "] must be (B=", B, ", C, h, w), got shape ",
                f.sizes());
    TORCH_CHECK_VALUE(r.sizes() == f.sizes(), op, ": reference[", i, "] must have the shape of features[", i, "] ", f.sizes(),
                ", got ", r.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(f.scalar_type()) && at::isFloatingType(r.scalar_type()), op, ": features[", i,
                "] and reference[", i, "] must be floating tensors");
    TORCH_CHECK_VALUE(f.device() == features[0].device() && r.device() == features[0].device(), op,
                ": all feature maps must be on one device");
  }
  int64_t oh = features[0].size(2), ow = features[0].size(3);
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] > 0 && (*size)[1] > 0, op,
                ": size must be (h, w) with positive entries, got ", *size);
    oh = (*size)[0], ow = (*size)[1];
  }
  TORCH_CHECK_VALUE(oh % pool == 0 && ow % pool == 0, op, ": the common size (", oh, ", ", ow,
              ") must be divisible by pool=", pool);
  const at::ScalarType acc = features[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor total;
  for (size_t i = 0; i < features.size(); ++i) {
    Tensor f = features[i].to(acc), r = reference[i].to(acc);
    f = f / f.norm(2, {1}, true).clamp_min(1e-12);
    r = r / r.norm(2, {1}, true).clamp_min(1e-12);
    Tensor d = (f - r).square().sum(1, true);  // (B,1,h,w)
    if (d.size(2) != oh || d.size(3) != ow) d = at::upsample_bilinear2d(d, {oh, ow}, false);
    total = total.defined() ? total + d : d;
  }
  total = total / static_cast<double>(features.size());
  if (pool > 1) total = at::avg_pool2d(total, {pool, pool}, {pool, pool});
  return total.squeeze(1);
}

std::tuple<Tensor, Tensor> mask_to_index(const Tensor& mask, std::optional<int64_t> max_count, int64_t num_prefix) {
  const char* op = "dtk.mask_to_index";
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2, op, ": mask must be (B, N), got shape ", mask.sizes(), " (flatten the grid first)");
  check_num_prefix(num_prefix);
  const int64_t B = mask.size(0), N = mask.size(1), P = num_prefix;
  const int64_t n_max = max_count.value_or(P + N);
  TORCH_CHECK_VALUE(n_max >= 0, op, ": max_count must be >= 0, got ", n_max);
  auto iopt = mask.options().dtype(at::kLong);
  Tensor pos = mask.cumsum(1, at::kLong) - 1 + P;                                  // slot of each set token
  Tensor target = at::where(mask & (pos < n_max), pos, at::full({}, n_max, iopt));  // n_max = discard column
  Tensor src = (at::arange(N, iopt) + P).to(at::kInt).unsqueeze(0).expand({B, N});
  Tensor buf = at::full({B, n_max + 1}, -1, mask.options().dtype(at::kInt));
  buf.scatter_(1, target, src);
  Tensor index = buf.narrow(1, 0, n_max).contiguous();
  if (P > 0 && n_max > 0) {
    const int64_t np = std::min(P, n_max);
    index.narrow(1, 0, np).copy_(at::arange(np, mask.options().dtype(at::kInt)).unsqueeze(0).expand({B, np}));
  }
  Tensor count = (mask.sum(at::IntArrayRef{1}, false, at::kInt) + P).to(at::kInt);
  return {index, count};
}

// A (B, h, w) bool mask, as a (B, 1, h, w) float map for the pooling ops (reuse's own check).
Tensor check_mask3(const Tensor& mask, const char* op) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 3, op, ": mask must be (B, h, w), got shape ", mask.sizes());
  return mask.to(at::kFloat).unsqueeze(1);
}

Tensor dilate_mask(const Tensor& mask, int64_t iterations) {
  const char* op = "dtk.dilate_mask";
  Tensor x = check_mask3(mask, op);
  TORCH_CHECK_VALUE(iterations >= 0, op, ": iterations must be >= 0, got ", iterations);
  for (int64_t i = 0; i < iterations && x.sym_numel() != 0; ++i) x = at::max_pool2d(x, {3, 3}, {1, 1}, {1, 1});
  return (x > 0.5).squeeze(1);
}

Tensor prune_isolated(const Tensor& mask, int64_t min_neighbors) {
  const char* op = "dtk.prune_isolated";
  Tensor x = check_mask3(mask, op);
  TORCH_CHECK_VALUE(min_neighbors >= 0 && min_neighbors <= 8, op, ": min_neighbors must be in [0, 8], got ", min_neighbors);
  if (x.sym_numel() == 0) return mask.clone();
  // 3x3 sum (zero padding) minus the centre = number of set 8-neighbours.
  Tensor cnt = (at::avg_pool2d(x, {3, 3}, {1, 1}, {1, 1}, false, true) * 9.0 - x).round();
  return (mask & (cnt >= static_cast<double>(min_neighbors)).squeeze(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CPU, m) { m.impl("scatter_blend", &scatter_blend_cpu); }

TORCH_LIBRARY_IMPL(dtk, CompositeExplicitAutograd, m) {
  m.impl("token_change_score", &token_change_score);
  m.impl("mask_to_index", &mask_to_index);
  m.impl("dilate_mask", &dilate_mask);
  m.impl("prune_isolated", &prune_isolated);
}

}  // namespace dtk::reuse
