// CPU engine of dtk::window_attention: tiled over (batch, query blocks), per-query key lists
// enumerated analytically from the window geometry (never an S x S mask), online softmax.
// Memory: O(S) index scratch per thread; no input copies (any B/S/H strides).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/debug.h"
#include "common/window_geometry.h"

namespace dtk {
namespace {

constexpr int64_t kQueryBlock = 16;  // queries per parallel work item
constexpr int64_t kKeyChunk = 128;   // keys scored per online-softmax step

// Largest t >= 0 with t*t < x (x >= 1).
inline int64_t isqrt_below(int64_t x) {
  int64_t t = static_cast<int64_t>(std::sqrt(static_cast<double>(x - 1)));
  while (t > 0 && t * t >= x) --t;
  while ((t + 1) * (t + 1) < x) ++t;
  return t;
}

// Appends the sequence indices of the window keys of grid query g (grid-relative index).
void window_keys(const WindowGeometry& geo, int64_t g, std::vector<int64_t>& keys) {
  const Coord3 c = geo.coords(g);
  const int64_t p[3] = {c.x0, c.x1, c.x2};
  int64_t lo[3], hi[3], ctr[3];
  for (int a = 0; a < 3; ++a) geo.axis_range(a, p[a], lo[a], hi[a], ctr[a]);
  const int64_t P = geo.num_prefix;
  const int64_t n1 = geo.grid[1], n2 = geo.grid[2];
  const int64_t r2 = geo.radius * geo.radius;
  for (int64_t x0 = lo[0]; x0 <= hi[0]; ++x0) {
    const int64_t d0 = x0 - ctr[0];
    if (geo.circle && d0 * d0 >= r2) continue;
    for (int64_t x1 = lo[1]; x1 <= hi[1]; ++x1) {
      int64_t a2 = lo[2], b2 = hi[2];
      if (geo.circle) {
        const int64_t d1 = x1 - ctr[1];
        const int64_t rem = r2 - d0 * d0 - d1 * d1;  // need d2^2 < rem
        if (rem <= 0) continue;
        const int64_t t = isqrt_below(rem);
        a2 = std::max(a2, ctr[2] - t);
        b2 = std::min(b2, ctr[2] + t);
      }
      if (!geo.tiled) {
        const int64_t base = P + (x0 * n1 + x1) * n2;
        for (int64_t x2 = a2; x2 <= b2; ++x2) keys.push_back(base + x2);
      } else {
        for (int64_t x2 = a2; x2 <= b2; ++x2) keys.push_back(P + geo.layout.index({x0, x1, x2}));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* __restrict__ qf, const scalar_t* __restrict__ k, int64_t D) {
  acc_t s[4] = {0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    s[0] += qf[d] * static_cast<acc_t>(k[d]);
    s[1] += qf[d + 1] * static_cast<acc_t>(k[d + 1]);
    s[2] += qf[d + 2] * static_cast<acc_t>(k[d + 2]);
    s[3] += qf[d + 3] * static_cast<acc_t>(k[d + 3]);
  }
  for (; d < D; ++d) s[0] += qf[d] * static_cast<acc_t>(k[d]);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Running state of one query row's online softmax.
template <typename acc_t>
struct RowState {
  acc_t m;   // running max of the scaled scores
  acc_t l;   // running sum of exp(score - m)
  acc_t* acc;  // running sum of exp(score - m) * v, length D
};

// Folds the keys kbase[idx[j] * ks] (idx == nullptr: j) for j < count into the row state.
template <typename scalar_t, typename acc_t>
void attend(RowState<acc_t>& st, const acc_t* qf, acc_t scale, const scalar_t* kbase, int64_t ks,
            const scalar_t* vbase, int64_t vs, const int64_t* idx, int64_t count, int64_t D, acc_t* scores) {
  for (int64_t j0 = 0; j0 < count; j0 += kKeyChunk) {
    const int64_t n = std::min(kKeyChunk, count - j0);
    acc_t cmax = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = idx ? idx[j0 + j] : j0 + j;
      const acc_t sc = dot<scalar_t, acc_t>(qf, kbase + t * ks, D) * scale;
      scores[j] = sc;
      cmax = std::max(cmax, sc);
    }
    if (cmax > st.m) {
      const acc_t alpha = std::exp(st.m - cmax);  // 0 when st.m is -inf
      st.l *= alpha;
      for (int64_t d = 0; d < D; ++d) st.acc[d] *= alpha;
      st.m = cmax;
    }
    if (st.m == -std::numeric_limits<acc_t>::infinity()) continue;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t pj = std::exp(scores[j] - st.m);
      st.l += pj;
      const scalar_t* vr = vbase + (idx ? idx[j0 + j] : j0 + j) * vs;
      acc_t* __restrict__ a = st.acc;
      for (int64_t d = 0; d < D; ++d) a[d] += pj * static_cast<acc_t>(vr[d]);
    }
  }
}

template <typename scalar_t>
void run_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* ek,
             const at::Tensor* ev, const WindowGeometry& geo, double scale_d, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(2), group = H / Hkv;
  const int64_t E = ek ? ek->size(1) : 0;
  const int64_t P = geo.num_prefix;
  const acc_t scale = static_cast<acc_t>(scale_d);

  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* ekp = ek ? ek->const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* evp = ev ? ev->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  float* lp = lse.mutable_data_ptr<float>();

  const int64_t nblk = (S + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys;
    keys.reserve(static_cast<size_t>(std::min<int64_t>(S, 4096)));
    std::vector<acc_t> qf(D), acc(D), scores(kKeyChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / nblk;
      const int64_t s0 = (item % nblk) * kQueryBlock, s1 = std::min(S, s0 + kQueryBlock);
      for (int64_t s = s0; s < s1; ++s) {
        const bool prefix_query = s < P;
        keys.clear();
        if (!prefix_query) {
          for (int64_t j = 0; j < P; ++j) keys.push_back(j);
          window_keys(geo, s - P, keys);
        }
        const int64_t* idx = prefix_query ? nullptr : keys.data();  // prefix queries: all S keys
        const int64_t nkeys = prefix_query ? S : static_cast<int64_t>(keys.size());
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / group;
          const scalar_t* qr = qp + b * q.stride(0) + s * q.stride(1) + h * q.stride(2);
          for (int64_t d = 0; d < D; ++d) qf[d] = static_cast<acc_t>(qr[d]);
          std::fill(acc.begin(), acc.end(), acc_t(0));
          RowState<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc.data()};
          attend<scalar_t, acc_t>(st, qf.data(), scale, kp + b * k.stride(0) + hk * k.stride(2), k.stride(1),
                                  vp + b * v.stride(0) + hk * v.stride(2), v.stride(1), idx, nkeys, D, scores.data());
          if (!prefix_query && E > 0) {
            attend<scalar_t, acc_t>(st, qf.data(), scale, ekp + b * ek->stride(0) + hk * ek->stride(2),
                                    ek->stride(1), evp + b * ev->stride(0) + hk * ev->stride(2), ev->stride(1),
                                    nullptr, E, D, scores.data());
          }
          scalar_t* orow = op + ((b * S + s) * H + h) * D;
          float* lrow = lp + (b * H + h) * S + s;
          if (st.l > acc_t(0)) {
            const acc_t inv = acc_t(1) / st.l;
            for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<scalar_t>(acc[d] * inv);
            *lrow = static_cast<float>(st.m + std::log(st.l));
          } else {  // no allowed key
            for (int64_t d = 0; d < D; ++d) orow[d] = scalar_t(0);
            *lrow = -std::numeric_limits<float>::infinity();
          }
        }
      }
    }
  });
}

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "dtk::window_attention (CPU)", [&] {
    run_cpu<scalar_t>(q, k, v, ek, ev, geo, sc, out, lse);
  });
  return {out, lse};
}

}  // namespace
}  // namespace dtk

TORCH_LIBRARY_IMPL(dtk, CPU, m) { m.impl("window_attention", &dtk::window_attention_cpu); }
