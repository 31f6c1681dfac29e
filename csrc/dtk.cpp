// All dtk op schemas, and nothing else. Kernels register per dispatch key beside their sources
// (csrc/<family>/cpu.cpp, csrc/<family>/cuda_ops.cpp) or from Python (Triton, fake kernels).
#include <Python.h>
#include <torch/library.h>

// Build facts set by CMakeLists.txt (read by dtk.info(); DTK_WITH_CUDA says the CUDA C++ kernels exist).
#ifndef DTK_BUILD_CUDA_ARCHS
#define DTK_BUILD_CUDA_ARCHS ""
#endif
#ifndef DTK_BUILD_CUDA_VERSION
#define DTK_BUILD_CUDA_VERSION ""
#endif
#ifndef DTK_BUILD_CUDA_NOTE
#define DTK_BUILD_CUDA_NOTE ""
#endif
#ifndef DTK_BUILD_TORCH_VERSION
#define DTK_BUILD_TORCH_VERSION ""
#endif

// `import dtk._C` loads this library, which runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
#ifdef DTK_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", DTK_BUILD_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "cuda_version", DTK_BUILD_CUDA_VERSION) < 0 ||
      PyModule_AddStringConstant(m, "cuda_note", DTK_BUILD_CUDA_NOTE) < 0 ||
      PyModule_AddStringConstant(m, "torch_version", DTK_BUILD_TORCH_VERSION) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

TORCH_LIBRARY(dtk, m) {
  // Window attention over a 1D/2D/3D token grid after `num_prefix` global tokens.
  // Returns (out (B,S,H,D), lse (B,H,S) float32). See python/dtk/ops/window/__init__.py.
  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int[] grid, int[]? window, int? radius, "
      "str border, int num_prefix, int[]? tile, float? scale, Tensor? extra_k, Tensor? extra_v) "
      "-> (Tensor, Tensor)");
  // Gradients of window_attention from its (out, lse) and the gradients of both (grad_lse may be
  // None): (dq, dk, dv, d_extra_k, d_extra_v), each in its input's dtype; without extra keys the
  // last two are (B, 0, H_kv, D).
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, int[] grid, int[]? window, int? radius, str border, int num_prefix, int[]? tile, float? scale, "
      "Tensor? extra_k, Tensor? extra_v) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Reorders the grid tokens (dim 1, after num_prefix) of x between row-major and tile order.
  m.def("tile_reorder(Tensor x, int[] grid, int[] tile, int num_prefix, bool inverse) -> Tensor");

  // Linear attention (LinFusion / MEMO). See python/dtk/ops/linear/__init__.py.
  // q (B,Sq,H,D), k (B,Sk,Hkv,D), v (B,Sk,Hkv,Dv); with cu_seqlens (int32) the inputs are packed
  // (1,total,H,D): cu_seqlens packs q and, without cu_seqlens_k, k too; cu_seqlens_k (int32, as
  // many sequences; FlashAttention's cu_seqlens_q / cu_seqlens_k) packs k and v separately.
  // cu_seqlens_k is last so that callers without it keep working. Returns out (B,Sq,H,Dv) in q's dtype.
  m.def(
      "linear_attention(Tensor q, Tensor k, Tensor v, str feature_map, bool normalize, float eps, "
      "float? scale, Tensor? cu_seqlens, Tensor? cu_seqlens_k=None) -> Tensor");
  // Gradients of linear_attention: (dq, dk, dv).
  m.def(
      "linear_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, str feature_map, "
      "bool normalize, float eps, float? scale, Tensor? cu_seqlens, Tensor? cu_seqlens_k=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Additive state of a key/value sequence: (kv_sum (B,Hkv,D,Dv), k_sum (B,Hkv,D), count (B,) int64),
  // float32 (float64 for float64 inputs); B = number of sequences with cu_seqlens.
  m.def("linear_attention_state(Tensor k, Tensor v, str feature_map, Tensor? cu_seqlens) -> (Tensor, Tensor, Tensor)");
  // linear_attention of q against a (summed) state.
  m.def(
      "linear_attention_apply(Tensor q, Tensor kv_sum, Tensor k_sum, Tensor count, str feature_map, "
      "bool normalize, float eps, float? scale, Tensor? cu_seqlens) -> Tensor");
  // MEMO: memory linear attention over frames with a decayed memory (mem_kv (B,H,D,Dv), mem_z (B,H,D)).
  m.def(
      "memory_linear_attention(Tensor q, Tensor k, Tensor v, Tensor? mem_kv, Tensor? mem_z, float decay) "
      "-> Tensor");
  // MEMO: memory after n past frames (k, v): returns (kv, z), float32 (float64 for float64 inputs).
  m.def(
      "memory_linear_attention_update(Tensor k, Tensor v, Tensor? mem_kv, Tensor? mem_z, float decay) "
      "-> (Tensor, Tensor)");
  // MEMO's clip step fused: (out of memory_linear_attention, new kv, new z of
  // memory_linear_attention_update with the same clip's k, v), one pass over k, v and the memory.
  m.def(
      "memory_linear_attention_step(Tensor q, Tensor k, Tensor v, Tensor? mem_kv, Tensor? mem_z, float decay) "
      "-> (Tensor out, Tensor new_kv, Tensor new_z)");
  // Gradients of memory_linear_attention: (dq, dk, dv, d_mem_kv, d_mem_z); without memory the
  // last two are empty (0,) tensors.
  m.def(
      "memory_linear_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mem_kv, "
      "Tensor? mem_z, float decay) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of memory_linear_attention_update from those of (kv, z) (either may be None):
  // (dk, dv, d_mem_kv, d_mem_z), the last two empty (0,) tensors without memory.
  m.def(
      "memory_linear_attention_update_backward(Tensor? grad_kv, Tensor? grad_z, Tensor k, Tensor v, "
      "Tensor? mem_kv, Tensor? mem_z, float decay) -> (Tensor, Tensor, Tensor, Tensor)");

  // Sparse-token attention (OminiControl, SpotEdit, DualParal). See python/dtk/ops/sparse/__init__.py.
  // q (B,Sq,H,D) over the keys of several K/V segments ks[i]/vs[i] (B,L_i,Hkv,D) without concatenating
  // them; kv_index[i] (L'_i,) or (B,L'_i) int picks a key subset of segment i (-1 = padding, skipped).
  // q_index (B,n) int: only those query rows (-1 = padding). Returns (out, lse (B,H,n) float32) with
  // out (B,n,H,D) (or (B,Sq,H,D) without q_index).
  m.def(
      "multi_kv_attention(Tensor q, Tensor[] ks, Tensor[] vs, Tensor?[] kv_index, Tensor? q_index, "
      "float? scale) -> (Tensor, Tensor)");
  // Gradients of multi_kv_attention from its (out, lse) and their gradients (grad_lse may be None):
  // (dq like q, dks[i] like ks[i], dvs[i] like vs[i]); rows no query / no index entry reaches get 0,
  // repeated q_index or kv_index entries add up.
  m.def(
      "multi_kv_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor[] ks, Tensor[] vs, "
      "Tensor?[] kv_index, Tensor? q_index, float? scale, Tensor out, Tensor lse) -> (Tensor, Tensor[], Tensor[])");
  // Out variant: the results of the q_index rows are scattered into out (B,Sq,H,D) in place; every
  // other row of out is left untouched. Returns lse (B,H,n) float32.
  m.def(
      "multi_kv_attention_out(Tensor q, Tensor[] ks, Tensor[] vs, Tensor?[] kv_index, Tensor q_index, "
      "float? scale, Tensor(a!) out) -> Tensor");
  // G branches packed along S (cu_seqlens int32, G+1 entries, shared by q and k); query branch a sees
  // key branch b iff group_mask[a,b]; group_bias[a,b] is added to those scores. Returns (out, lse).
  m.def(
      "segment_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor group_mask, "
      "Tensor? group_bias, float? scale) -> (Tensor, Tensor)");
  // Gradients of segment_attention (q, k, v; group_bias is not differentiated): (dq, dk, dv).
  m.def(
      "segment_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor cu_seqlens, Tensor group_mask, Tensor? group_bias, float? scale, Tensor out, Tensor lse) "
      "-> (Tensor, Tensor, Tensor)");

  // QK-norm + rotary embedding in one pass (FLUX's attention inputs). See python/dtk/ops/rotary/__init__.py.
  // x (B,S,H,D): RMS norm over D (weight (D,) optional), or with across_heads over each token's H*D
  // values (Wan; weight (H*D,)), then, with cos/sin (S,D) float, the rotary embedding of each head's
  // interleaved pairs (2i, 2i+1) or halves (i, i + D/2). fp32 math (fp64 for fp64), one rounding.
  // Returns (B,S,H,D) contiguous in x's dtype.
  m.def(
      "rms_norm_rope(Tensor x, Tensor? weight, Tensor? cos, Tensor? sin, float eps, bool interleaved, "
      "bool across_heads=False) -> Tensor");

  // Cache and token selection (SpotEdit, FreeSwim). See python/dtk/ops/reuse/__init__.py.
  // cache[:, index] = fresh in place; returns (1-lam)*scattered(base) + lam*cache. lam is the float,
  // or lam_per_batch (B,) when given.
  m.def(
      "scatter_blend(Tensor base, Tensor(a!) cache, Tensor fresh, Tensor index, float lam, "
      "Tensor? lam_per_batch) -> Tensor");
  // Per-token change score (B, h'/pool, w'/pool) float32 from lists of (B,C,h,w) feature maps.
  m.def("token_change_score(Tensor[] features, Tensor[] reference, int pool, int[]? size) -> Tensor");
  // mask (B,N) bool -> (index (B,n_max) int32 padded with -1, count (B,) int32), on the device.
  m.def("mask_to_index(Tensor mask, int? max_count, int num_prefix) -> (Tensor, Tensor)");
  // 3x3 clean-ups of a (B,h,w) bool mask.
  m.def("dilate_mask(Tensor mask, int iterations) -> Tensor");
  m.def("prune_isolated(Tensor mask, int min_neighbors) -> Tensor");
}
