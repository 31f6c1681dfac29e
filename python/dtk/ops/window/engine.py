"""How a CUDA call of window_attention (and its backward) is served: which engine, which blocks
and launch, whether the prefix rows go to the dense kernel, and when candidates are timed
(docs/architecture.md, "Engines and configuration"). The kernel modules (triton.py,
triton_backward.py, triton_single_loop.py) take all of that as arguments and read no setting.

Engines (the `window_engine` setting, or `dtk.window_attention(..., engine=...)`):
  "triton"              the main engine (triton.py, triton_backward.py): every problem, forward
                        and backward. "auto" (the default) is this engine: the measured default.
  "triton-single-loop"  the warp-specialized single-loop forward (triton_single_loop.py), only
                        where pinned; a problem it cannot take is an error that says why
                        (can_run_single_loop). Its backward is the main engine's.

Blocks: `default_blocks` (a rule), the `window_blocks` setting, or on a GPU with `autotune` on
the fastest of `block_candidates` timed on a problem's first call (`choose_blocks`, cached in
dtk._tuning under "window.blocks"). The prefix rows go to the dense kernel (prefix.py) where the
`window_prefix_by_dense` setting asks for it and the kernel takes the tensors; a dense kernel that
fails on a call is said once per problem and that call's prefix rows are the Triton kernel's (the
next call tries the dense kernel again)."""
from __future__ import annotations

import functools
import math

import torch
import triton
from triton.runtime.errors import OutOfResources

from ... import _config, _tuning
from ..._debug import new_output
from .._attention.dense import dense_supported, join_streams
from .._attention.triton import backward_block, backward_launch_configs, launch_configs
from . import triton_single_loop as single_loop
from .plan import block_fill
from .prefix import start_prefix_dense
from .spec import WindowSpec
from .triton import window_forward
from .triton_backward import window_backward

ENGINES = ("triton", "triton-single-loop")

# The settings the engines' kernels depend on: part of the key of every timed choice.
KERNEL_SETTINGS = ("window_mask_by_dot", "window_prefix_by_dense")


# ----------------------------------------------------------------------------------- blocks

def default_blocks(device: torch.device, D: int, spec: WindowSpec | None = None):
    """(query block, key block) sizes: small ones in the interpreter; on a GPU the `window_blocks`
    setting where given (block-size sweeps), else for D <= 128 (the larger blocks fit shared
    memory) 128 x 128 where the layout tiles fill 128-key blocks clearly better than 64-key ones
    (FreeSwim's (21, 3, 2) tiles: plan efficiency 0.58 -> 0.88), or where a box window's tiles hold
    whole 128-key blocks (the plan is the same at either key block, and the wider block measured
    faster: benchmarks/RESULTS.md); else 128 x 64."""
    if device.type != "cuda":
        return 16, 16
    override = _config.get("window_blocks")
    if override:
        return override
    if spec is None or D > 128:
        return 128, 64
    whole_tiles = spec.window is not None and spec.tiled and math.prod(spec.tile) % 128 == 0
    wide = whole_tiles or block_fill(spec, 128) > block_fill(spec, 64) + 0.05
    return 128, 128 if wide else 64


def block_candidates(D: int, spec: WindowSpec) -> list:
    """The (query block, key block) sizes `choose_blocks` times on a GPU: the rule's choice
    (default_blocks) first, then 128 x 64, 128 x 128 (D <= 128: shared memory) and 64 x 64."""
    rule = default_blocks(torch.device("cuda"), D, spec)
    others = [(128, 64), (128, 128), (64, 64)] if D <= 128 else [(128, 64), (64, 64)]
    return list(dict.fromkeys([rule] + others))


def problem_key(q, k, spec: WindowSpec, extra_k):
    """What the engine's timed choices and fallback warnings are kept under: one problem."""
    return spec, tuple(q.shape), k.shape[2], 0 if extra_k is None else extra_k.shape[1], q.dtype, q.device


def choose_blocks(q, k, v, spec: WindowSpec, scale: float, extra_k=None, extra_v=None):
    """The main engine's (query block, key block) for this problem. On a GPU with autotuning on
    (the default; `autotune=False` and `window_blocks` skip it), each of block_candidates runs on
    the call's own tensors the first time the problem is seen (compiles, then three timed runs) and
    the fastest is kept for the process (dtk._tuning, "window.blocks"): the plan depends on the
    blocks, so the launch autotuner, which tunes warps and stages per block size, cannot choose
    them. Elsewhere, and for a problem first seen while a CUDA graph is being captured, the rule
    (default_blocks)."""
    D = q.shape[3]

    def default():
        return default_blocks(q.device, D, spec)
    if _config.get("window_blocks"):
        return default()

    def measure():
        times = {}
        for blocks in block_candidates(D, spec):
            run = functools.partial(_run_main, q, k, v, spec, scale, extra_k, extra_v, blocks, None)
            try:
                run()
            except OutOfResources:   # a card with less shared memory
                continue
            times[blocks] = _tuning.median_ms(run, reps=3)
        return min(times, key=times.get) if times else default()
    return _tuning.choice("window.blocks", problem_key(q, k, spec, extra_k), q.device, measure, default,
                          settings=KERNEL_SETTINGS)


# ----------------------------------------------------------------------------- prefix rows

def prefix_by_dense(q, k) -> bool:
    """Whether a call's prefix rows go to the dense kernel: the `window_prefix_by_dense` setting,
    and the kernel takes these tensors (ops/_attention/dense.py, dense_supported)."""
    return _config.get("window_prefix_by_dense") and dense_supported(q, k)


def _start_prefix(q, k, v, out, lse, spec: WindowSpec, scale: float, extra_k):
    """Starts rows [0, P) of (out, lse) by the dense kernel where prefix_by_dense says so. Returns
    (started, the side stream to join or None); not started, the caller's Triton kernel owes those
    rows. A dense kernel that fails is said once per problem (for this call only)."""
    if not (spec.num_prefix and prefix_by_dense(q, k)):
        return False, None
    try:
        return True, start_prefix_dense(q, k, v, out, lse, spec.num_prefix, scale)
    except RuntimeError as e:   # a build or card without this attention
        _config.fallback_warning("dtk window_attention (prefix rows by the dense kernel)",
                                 problem_key(q, k, spec, extra_k), e, "the Triton kernel's prefix programs")
        return False, None


# ----------------------------------------------------------------------------- engines

def can_run_triton(q, k, v, spec: WindowSpec, extra_k=None, raise_error: bool = False) -> bool:
    """The main engine serves every problem the op's checks accept (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1)."""
    return True


def _single_loop_setup(q, k, v, spec: WindowSpec, extra_k):
    """(the single-loop engine's launch inputs: plan, entries, counts, q / kv descriptors, key
    block, head-dim block; "") or (None, why it cannot serve the problem). Checked without running
    anything."""
    D = q.shape[3]
    block_d = max(16, triton.next_power_of_2(D))
    if extra_k is not None:
        return None, "it takes no extra keys"
    if block_d > 128:
        return None, f"it takes head dims up to 128, got {D}"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        return None, "it needs a Hopper (sm_90) or newer GPU"
    if spec.num_prefix and not prefix_by_dense(q, k):
        return None, ("its prefix rows go to the dense kernel, which does not take this call (window_prefix_by_dense "
                      "off, or a dtype, head dim or GQA layout the dense kernel does not take)")
    block_k = single_loop.key_block(q.device)
    kv = single_loop.tma_descriptors((k, v), block_k, block_d)
    qd = single_loop.tma_descriptors((q,), single_loop.BLOCK_Q, block_d)
    if kv is None or qd is None:
        return None, "the layout of q, k or v does not suit TMA copies (16-byte aligned strides and data)"
    built = single_loop.ws_plan(spec, block_k, q.device)
    if built is None:
        return None, "the plan has partial key blocks of another shape than its key shape (edge tiles)"
    return (*built, qd, kv, block_k, block_d), ""


def can_run_single_loop(q, k, v, spec: WindowSpec, extra_k=None, raise_error: bool = False) -> bool:
    """Whether the single-loop engine serves this problem; with raise_error a ValueError saying
    why not instead of False."""
    setup, why = _single_loop_setup(q, k, v, spec, extra_k)
    if setup is None and raise_error:
        raise ValueError(_SINGLE_LOOP_DECLINES + why)
    return setup is not None


_SINGLE_LOOP_DECLINES = "window_engine='triton-single-loop' cannot serve this call: "


def _check_launch(launch):
    if launch is not None and not (len(launch) == 2 and all(isinstance(x, int) and x >= 1 for x in launch)):
        raise ValueError(f"launch must be (num_warps, num_stages), two ints >= 1, got {launch!r}")


def _run_main(q, k, v, spec: WindowSpec, scale: float, extra_k, extra_v, block, launch, dense_prefix=True):
    """(out, lse) by the main engine at `block` (default: choose_blocks; with `launch` given, the
    rule) and `launch` (default: the launch autotuner on a GPU with autotune on, else the first
    launch_configs entry)."""
    B, S, H, D = q.shape
    if block is None:
        block = default_blocks(q.device, D, spec) if launch else choose_blocks(q, k, v, spec, scale, extra_k, extra_v)
    block = (block, block) if isinstance(block, int) else tuple(block)
    if launch is None and not (q.device.type == "cuda" and _config.get("autotune")):
        warps, stages = launch_configs(max(16, triton.next_power_of_2(D)), block[1])[0]
        launch = (warps if block[0] >= 64 else 4, stages)
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    by_dense, side = _start_prefix(q, k, v, out, lse, spec, scale, extra_k) if dense_prefix else (False, None)
    window_forward(q, k, v, spec, scale, extra_k, extra_v, out, lse, block=block, launch=launch,
                   mask_by_dot=_config.get("window_mask_by_dot"), prefix_rows=not by_dense)
    if side is not None:
        join_streams([side])
    return out, lse


def _run_single_loop(q, k, v, spec: WindowSpec, scale: float, setup, launch):
    """(out, lse) by the single-loop engine, or by the main engine where the prefix rows' dense
    kernel fails on this call; returns the engine that served too."""
    B, S, H, D = q.shape
    out = new_output((B, S, H, D), like=q)
    lse = new_output((B, H, S), like=q, dtype=torch.float32)
    by_dense, side = _start_prefix(q, k, v, out, lse, spec, scale, None)
    if spec.num_prefix and not by_dense:   # the dense kernel failed just now: the main engine's prefix programs
        return _run_main(q, k, v, spec, scale, None, None, None, None, dense_prefix=False), "triton"
    if launch is None:
        launch = (single_loop.NUM_WARPS, single_loop.NUM_STAGES) if q.device.type == "cuda" else (4, 1)
    single_loop.single_loop_forward(q, k, spec, scale, out, lse, setup, launch=launch)
    if side is not None:
        join_streams([side])
    return (out, lse), "triton-single-loop"


def window_attention_triton(q, k, v, spec: WindowSpec, scale: float, extra_k=None, extra_v=None, block=None,
                            launch=None):
    """(out, lse) of dtk::window_attention on CUDA tensors (or CPU tensors under
    TRITON_INTERPRET=1) by the engine the `window_engine` setting names. `block` (the main
    engine's; (block_q, block_k) or one int for both) and `launch` = (num_warps, num_stages) fix
    what the engine would choose (no timing: benchmarks/window_sweep.py)."""
    _check_launch(launch)
    if _config.get("window_engine") == "triton-single-loop":
        if block is not None:
            raise ValueError("window_engine='triton-single-loop' has fixed blocks: block= is the main engine's")
        setup, why = _single_loop_setup(q, k, v, spec, extra_k)
        if setup is None:
            raise ValueError(_SINGLE_LOOP_DECLINES + why)
        res, served = _run_single_loop(q, k, v, spec, scale, setup, launch)
    else:
        res, served = _run_main(q, k, v, spec, scale, extra_k, extra_v, block, launch), "triton"
    _config.record_engine("window_attention", served)
    return res


def window_attention_backward_triton(grad_out, grad_lse, q, k, v, out, lse, spec: WindowSpec, scale: float,
                                     extra_k=None, extra_v=None, block=None):
    """(dq, dk, dv, d_extra_k, d_extra_v) of dtk::window_attention_backward on CUDA tensors: the
    main engine's backward (whichever engine ran the forward), at 64 x 64 blocks on a GPU (16 in
    the interpreter) unless `block` is given."""
    block = block or backward_block(q.device)
    block_d = max(16, triton.next_power_of_2(q.shape[3]))
    dq_launch, dkdv_launch = backward_launch_configs(block_d) if q.device.type == "cuda" else ((4, 1), (4, 1))
    res = window_backward(grad_out, grad_lse, q, k, v, out, lse, spec, scale, extra_k, extra_v, block=block,
                          dq_launch=dq_launch, dkdv_launch=dkdv_launch,
                          mask_by_dot=_config.get("window_mask_by_dot"))
    _config.record_engine("window_attention_backward", "triton")
    return res
