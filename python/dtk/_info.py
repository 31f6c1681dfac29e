"""``dtk.info()`` / ``python -m dtk``: versions, and which engines this install can run, and why not.

Engines: the pure-torch reference (always), the C++ CPU kernels (``dtk._C``), the CUDA C++ kernels
(only when ``dtk._C`` was compiled with nvcc; ``dtk._C.with_cuda``), and the Triton GPU kernels
(registered from Python, so they work from any build as long as Triton imports and a GPU is
present). Nothing here runs a kernel; Triton is imported (not compiled) to check it loads.
"""
from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any, Dict, List, Optional

import torch

from . import _config

# CUDA kernels registered from Python (torch.library.register_kernel): which engine each one is.
# Anything not listed here and registered from Python is a Triton kernel.
_PY_CUDA_ENGINE = {"tile_reorder": "torch (fallback)",
                   "multi_kv_attention": "cuDNN + Triton merge (dense MHA segments), else Triton",
                   "multi_kv_attention_out": "cuDNN + Triton merge (dense MHA segments), else Triton",
                   "segment_attention": "cuDNN + Triton merge (MHA, branch layout on the CPU), else Triton"}


def _triton() -> Dict[str, Any]:
    try:
        import triton
        return dict(ok=True, version=getattr(triton, "__version__", "?"), why=None)
    except ImportError as e:
        return dict(ok=False, version=None, why=f"not importable ({e})")
    except Exception as e:  # a broken install: say so rather than fail
        return dict(ok=False, version=None, why=f"import failed: {type(e).__name__}: {e}")


def _gpu() -> Dict[str, Any]:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return dict(ok=False, why=f"torch {torch.__version__} is a CPU-only build", devices=[])
    try:
        n = torch.cuda.device_count()
        ok = n > 0 and torch.cuda.is_available()
    except Exception as e:
        return dict(ok=False, why=f"CUDA init failed: {e}", devices=[])
    if not ok:
        return dict(ok=False, why="no CUDA device visible (driver, CUDA_VISIBLE_DEVICES?)", devices=[])
    devs = []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        devs.append(dict(index=i, name=p.name, capability=f"{p.major}.{p.minor}",
                         memory_gib=round(p.total_memory / 2 ** 30, 1)))
    return dict(ok=True, why=None, devices=devs)


def arch_coverage(archs: str, capability: str) -> str:
    """How the compiled CUDA archs (CMake style, "80,90a", "86-real", "90-virtual") serve a GPU of
    compute capability "M.m": "native sm_XY", "PTX JIT from compute_XY" or "not covered"."""
    major, minor = (int(x) for x in capability.split("."))
    cap = major * 10 + minor
    jit = []
    for a in filter(None, (x.strip() for x in archs.replace(";", ",").split(","))):
        m = re.fullmatch(r"(\d+)([af]?)(?:-(real|virtual))?", a)
        if not m:
            continue
        num, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        if num == cap and kind != "virtual":
            return f"native sm_{num}{suffix}"
        if num <= cap and kind != "real" and not suffix:   # arch-specific (a/f) PTX does not JIT forward
            jit.append(num)
    if jit:
        return f"PTX JIT from compute_{max(jit)}"
    return "not covered"


def _op_names() -> List[str]:
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("dtk::")]
    return sorted(n.split("::", 1)[1] for n in names)


_CPP_SOURCES = (".cpp", ".cu", ".cc", ".h")
_COMPOSITE = ("CompositeExplicitAutograd", "CompositeImplicitAutograd")


def _registered_at(dump: str, key: str) -> str:
    m = re.search(rf"^{key}(?:\[alias\])?: registered at (\S+?):\d+", dump, re.M)
    return m.group(1) if m else ""


def _kernel(op: str, key: str) -> Optional[str]:
    """Which engine serves dtk::op for the dispatch key (CPU / CUDA), or None: "C++", "CUDA C++",
    "Triton" / a Python-registered engine, or "C++ (any device)" for a device-generic composite
    kernel (torch ops called from C++, e.g. the mask ops of the reuse family)."""
    name = f"dtk::{op}"
    try:
        dump = torch._C._dispatch_dump(name)
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
            where = _registered_at(dump, key)
            if where.endswith(_CPP_SOURCES):
                return "C++" if key == "CPU" else "CUDA C++"
            if key == "CUDA":
                return _PY_CUDA_ENGINE.get(op, "Triton")
            return "Python"
        for alias in _COMPOSITE:
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, alias):
                return ("C++" if _registered_at(dump, alias).endswith(_CPP_SOURCES) else "Python") + " (any device)"
    except Exception:
        return "?"
    return None


def collect() -> Dict[str, Any]:
    """Everything :func:`info` prints, as a dict."""
    from . import _C, __version__
    tr, gpu = _triton(), _gpu()
    with_cuda = bool(getattr(_C, "with_cuda", 0))
    archs = getattr(_C, "cuda_archs", "")
    built_torch = getattr(_C, "torch_version", "") or None
    ops = {op: dict(cpu=_kernel(op, "CPU"), cuda=_kernel(op, "CUDA")) for op in _op_names()}
    n_cpu = sum(1 for v in ops.values() if (v["cpu"] or "").startswith("C++"))

    engines: Dict[str, Dict[str, Any]] = {}
    engines["reference"] = dict(ok=True, detail="pure torch, float64-capable (dtk.ops.<family>.reference)")
    engines["cpp_cpu"] = dict(ok=n_cpu > 0, detail=f"{n_cpu}/{len(ops)} ops have a C++ CPU (or any-device) kernel"
                              + (", OpenMP threads: %d" % torch.get_num_threads()))
    if with_cuda:
        detail = f"compiled for {archs or '?'} with CUDA {getattr(_C, 'cuda_version', '') or '?'}"
        if gpu["ok"]:
            detail += "; " + ", ".join(f"GPU {d['index']} (sm {d['capability']}): "
                                       f"{arch_coverage(archs, d['capability'])}" for d in gpu["devices"])
        elif gpu["why"]:
            detail += f"; not usable here: {gpu['why']}"
        engines["cuda_cpp"] = dict(ok=True, usable=gpu["ok"], archs=archs, detail=detail)
    else:
        note = getattr(_C, "cuda_note", "") or "not compiled"
        engines["cuda_cpp"] = dict(ok=False, usable=False, archs="",
                                   detail=f"not compiled: {note} (their ops fall back to torch on CUDA tensors)")
    if not tr["ok"]:
        engines["triton"] = dict(ok=False, usable=False, detail=f"Triton {tr['why']}")
    elif not gpu["ok"]:
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        engines["triton"] = dict(ok=True, usable=False,
                                 detail=f"Triton {tr['version']} imports, but no GPU: {gpu['why']}"
                                 + (" (TRITON_INTERPRET=1: interpreter on CPU tensors)" if interp else ""))
    else:
        engines["triton"] = dict(ok=True, usable=True, detail=f"Triton {tr['version']} on "
                                 + ", ".join(d["name"] for d in gpu["devices"]))

    return dict(
        version=__version__, path=os.path.dirname(os.path.abspath(__file__)),
        python=platform.python_version(), platform=platform.platform(terse=True),
        torch=torch.__version__, torch_cuda=torch.version.cuda, built_against_torch=built_torch,
        torch_mismatch=bool(built_torch) and built_torch.split("+")[0] != torch.__version__.split("+")[0],
        triton=tr, gpu=gpu, engines=engines, ops=ops,
        settings=_config.current(), last_engines={op: _config.last_engine(op) for op in ops if _config.last_engine(op)},
    )


_ENGINE_LABELS = [("reference", "reference engine"), ("cpp_cpu", "C++ CPU kernels"),
                  ("cuda_cpp", "CUDA C++ kernels"), ("triton", "Triton GPU kernels")]


def format_info(d: Dict[str, Any]) -> str:
    lines = [f"dtk {d['version']}  ({d['path']})",
             f"python {d['python']}  |  torch {d['torch']} (CUDA {d['torch_cuda'] or 'none'})  |  "
             f"triton {d['triton']['version'] or 'none'}  |  {d['platform']}"]
    if d["built_against_torch"]:
        lines.append(f"dtk._C built against torch {d['built_against_torch']}"
                     + ("  ** differs from the running torch: rebuild dtk if ops fail **" if d["torch_mismatch"] else ""))
    g = d["gpu"]
    lines.append("GPU: " + (", ".join(f"{x['index']}: {x['name']} (sm {x['capability']}, {x['memory_gib']} GiB)"
                                      for x in g["devices"]) if g["ok"] else f"none ({g['why']})"))
    lines += ["", "engines:"]
    for key, label in _ENGINE_LABELS:
        e = d["engines"][key]
        state = "yes" if e["ok"] and e.get("usable", True) else ("no GPU" if e["ok"] else "no")
        lines.append(f"  {label:<20} {state:<11} {e['detail']}")
    lines += ["", "ops (torch.ops.dtk.*):", f"  {'op':<34} {'CPU':<18} CUDA"]
    for op, k in d["ops"].items():
        lines.append(f"  {op:<34} {k['cpu'] or '-':<18} {k['cuda'] or '-'}")
    lines += ["", "settings (dtk.config; dtk.config_options() explains each):"]
    lines += [f"  {name:<24} {value!r}" for name, value in d["settings"].items()]
    if d["last_engines"]:
        lines += ["", "engines that served the latest calls (dtk.last_engine):"]
        lines += [f"  {op:<34} {engine}" for op, engine in d["last_engines"].items()]
    return "\n".join(lines)


def info(file=None, *, quiet: bool = False) -> Dict[str, Any]:
    """Prints dtk's version, torch / Triton / CUDA versions, which engines are available (C++ CPU
    kernels; CUDA C++ kernels compiled or not and for which archs; Triton; GPU) and why not, and
    each op's CPU / CUDA engine, the dtk.config settings in force and which engine served each op's
    latest call in this process. Returns the same facts as a dict (``quiet=True``: no printing)."""
    d = collect()
    if not quiet:
        print(format_info(d), file=file or sys.stdout)
    return d
