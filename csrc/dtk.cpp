// All dtk op schemas, and nothing else. Kernels register per dispatch key beside their sources
// (csrc/<family>/cpu.cpp, csrc/<family>/cuda_ops.cpp) or from Python (Triton, fake kernels).
#include <Python.h>
#include <torch/library.h>

// `import dtk._C` loads this library, which runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(dtk, m) {
  // Window attention over a 1D/2D/3D token grid after `num_prefix` global tokens.
  // Returns (out (B,S,H,D), lse (B,H,S) float32). See python/dtk/ops/window/__init__.py.
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[] grid, int[]? window, int? radius, "
      "str border, int num_prefix, int[]? tile, float? scale, Tensor? extra_k, Tensor? extra_v) "
      "-> (Tensor, Tensor)");
  // Reorders the grid tokens (dim 1, after num_prefix) of x between row-major and tile order.
  m.def("tile_reorder(Tensor x, int[] grid, int[] tile, int num_prefix, bool inverse) -> Tensor");
}
