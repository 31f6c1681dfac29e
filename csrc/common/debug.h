// Debug switches read once from the environment (mirrors python/dtk/_debug.py).
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace dtk {

// DTK_DEBUG_NAN_FILL=1: outputs are allocated filled with NaN so unwritten rows fail the tests.
inline bool nan_fill_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("DTK_DEBUG_NAN_FILL");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

// at::empty, NaN-filled under DTK_DEBUG_NAN_FILL=1 (floating and complex dtypes only).
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  if (nan_fill_enabled() && (at::isFloatingType(out.scalar_type()) || at::isComplexType(out.scalar_type()))) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

}  // namespace dtk
