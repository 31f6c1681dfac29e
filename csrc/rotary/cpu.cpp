// rms_norm_rope, CPU kernel: one pass per norm group (a (b, s, h) row, or with across_heads a token's
// H rows), OpenMP over groups (at::parallel_for).
// The GPU kernel is Triton (python/dtk/ops/rotary/triton.py); both follow reference.py.
#include "common/checks.h"
#include "common/debug.h"
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace dtk::rotary {
namespace {

using at::Tensor;

// cos / sin: an (S, D) floating table on x's device (rotary's own: no shared check has this shape).
void check_table(const Tensor& t, const char* name, const Tensor& x) {
  const char* op = "dtk.rms_norm_rope";
  const int64_t S = x.size(1), D = x.size(3);
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), ", expected x's device ", x.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == S && t.size(1) == D, op, ": ", name, " must be (S=", S, ", D=", D,
              "), got shape ", t.sizes());
}

Tensor rms_norm_rope_cpu(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& cos,
                         const std::optional<Tensor>& sin, double eps, bool interleaved, bool across_heads) {
  const char* op = "dtk.rms_norm_rope";
  check_bshd(x, "x");
  check_attention_dtype(x, "x", /*allow_double=*/true);
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be a positive finite float, got ", eps);
  if (weight.has_value()) {
    TORCH_CHECK_TYPE(at::isFloatingType(weight->scalar_type()), op, ": weight must be a floating tensor, got ",
                weight->scalar_type());
    const int64_t n = across_heads ? H * D : D;
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == n, op, ": weight must be (", across_heads ? "H*D=" : "D=", n,
                ",), got shape ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == x.device(), op, ": weight is on ", weight->device(), ", expected x's device ",
                x.device());
  }
  TORCH_CHECK_VALUE(cos.has_value() == sin.has_value(), op, ": cos and sin must be given together");
  const bool rope = cos.has_value();
  if (rope) {
    check_table(*cos, "cos", x);
    check_table(*sin, "sin", x);
    TORCH_CHECK_VALUE(D % 2 == 0, op, ": the rotary embedding needs an even head dim, got D=", D);
  }
  Tensor out = dtk::new_output({B, S, H, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t sb = x.stride(0), ss = x.stride(1), sh = x.stride(2);
  const int64_t half = D / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_rope", [&] {
    using opmath = at::opmath_type<scalar_t>;
    const auto table_type = c10::CppTypeToScalarType<opmath>::value;
    Tensor w = weight.has_value() ? weight->to(table_type).contiguous() : Tensor();
    Tensor c = rope ? cos->to(table_type).contiguous() : Tensor();
    Tensor s = rope ? sin->to(table_type).contiguous() : Tensor();
    const opmath* wp = w.defined() ? w.data_ptr<opmath>() : nullptr;
    const opmath* cp = rope ? c.data_ptr<opmath>() : nullptr;
    const opmath* sp = rope ? s.data_ptr<opmath>() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    // one norm group: a row (b, s, h), or with across_heads a token's H rows (consecutive rows)
    const int64_t G = across_heads ? H : 1;
    at::parallel_for(0, B * S * H / G, across_heads ? 1 : 64, [&](int64_t lo, int64_t hi) {
      std::vector<opmath> n(G * D);
      for (int64_t group = lo; group < hi; ++group) {
        const int64_t row0 = group * G;
        const int64_t b = row0 / (S * H), t = (row0 / H) % S, h0 = row0 % H;
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* xr = xp + b * sb + t * ss + (h0 + g) * sh;
          for (int64_t d = 0; d < D; ++d) n[g * D + d] = static_cast<opmath>(xr[d]);
        }
        opmath acc[4] = {0, 0, 0, 0};   // four partial sums: the loop vectorises without reassociation
        int64_t d = 0;
        for (; d + 4 <= G * D; d += 4)
          for (int j = 0; j < 4; ++j) acc[j] += n[d + j] * n[d + j];
        for (; d < G * D; ++d) acc[0] += n[d] * n[d];
        const opmath sumsq = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        const opmath r = opmath(1) / std::sqrt(sumsq / static_cast<opmath>(G * D) + static_cast<opmath>(eps));
        if (wp)
          for (int64_t i = 0; i < G * D; ++i) n[i] *= r * wp[i];
        else
          for (int64_t i = 0; i < G * D; ++i) n[i] *= r;
        for (int64_t g = 0; g < G; ++g) {
          const opmath* nr = n.data() + g * D;
          scalar_t* yr = op_ + (row0 + g) * D;
          if (!rope) {
            for (int64_t i = 0; i < D; ++i) yr[i] = static_cast<scalar_t>(nr[i]);
            continue;
          }
          const opmath* cr = cp + t * D;
          const opmath* sr = sp + t * D;
          // each pair (a, b) -> (a cos - b sin, b cos + a sin); branch-free loops that vectorise
          if (interleaved) {
            for (int64_t i = 0; i < D; i += 2) {
              const opmath a = nr[i], b2 = nr[i + 1];
              yr[i] = static_cast<scalar_t>(a * cr[i] - b2 * sr[i]);
              yr[i + 1] = static_cast<scalar_t>(b2 * cr[i + 1] + a * sr[i + 1]);
            }
          } else {
            for (int64_t i = 0; i < half; ++i) {
              const opmath a = nr[i], b2 = nr[i + half];
              yr[i] = static_cast<scalar_t>(a * cr[i] - b2 * sr[i]);
              yr[i + half] = static_cast<scalar_t>(b2 * cr[i + half] + a * sr[i + half]);
            }
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dtk, CPU, m) { m.impl("rms_norm_rope", &rms_norm_rope_cpu); }

}  // namespace dtk::rotary
