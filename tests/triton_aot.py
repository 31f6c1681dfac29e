"""Ahead-of-time compilation of Triton kernels for a GPU architecture without a GPU: catches the
errors that only the compiler (not the interpreter) reports, and shows whether Hopper's wgmma
instructions are used. Needs only Triton's bundled ptxas. Runs in a subprocess because the test
process may be in interpreter mode (TRITON_INTERPRET=1), where kernels cannot be compiled.

Kernels are compiled with the specialisation a real launch gets: the runtime marks 16-byte-aligned
pointers and integer arguments divisible by 16 (``tt.divisibility``), which lets Triton vectorise
loads into cp.async and software-pipeline loops (num_stages buffers in shared memory); without it
the reported shared memory is far below what the GPU needs. Every non-float argument is marked,
except those the kernel declares ``do_not_specialize`` (the runtime never marks them either).

Hopper builds are also passed through ptxas -v, which reports what the PTX alone does not: whether
the wgmma pipeline is serialised (warning C7515: wgmma instructions wait for each other, a large
slowdown that nothing else shows without a GPU), register count and spills; and their SASS
(Triton's bundled cuobjdump) tells whether any spill load or store sits inside a loop, where it
would cost on every iteration (a few spilled bytes outside the loops cost nothing)."""
import inspect
import json
import os
import subprocess
import sys


def job(kernel: str, arch: int, types: dict, constexprs: dict, default="i32", **options) -> dict:
    """One compilation: `kernel` ("module:function") for sm_`arch`. `types` maps argument names
    to Triton type strings ("*bf16", "fp32", "i1", ...); other non-constexpr arguments get
    `default`; `options` are compile options (num_warps, num_stages)."""
    return dict(kernel=kernel, arch=arch, types=types, constexprs=constexprs, default=default, options=options)


# Shared memory a program may use: sm_90 227 KiB, sm_80 163 KiB.
SMEM_LIMIT = {90: 232448, 80: 166912}


def case_report(arch: int, cases, results) -> list:
    """One line per compiled (kernel, function, D, config) case: shared memory, wgmma, cp.async,
    whether the wgmma pipeline is serialised, registers and spills."""
    return [f"sm_{arch} {k} D={D} {cfg}: shared {r['shared']} wgmma {r['wgmma']} cp.async {r['cp_async']}"
            f" serialised {r['serialized']} registers {r['registers']} spills {r['spill_bytes']}"
            for (k, _, D, cfg), r in zip(cases, results)]


def compile_and_check_fit(arch: int, cases, jobs):
    """Compiles the jobs of `cases` ((kernel, function, D, config) each), prints a report line per
    case (case_report) and asserts that none is over sm_`arch`'s shared-memory limit; returns
    (report, results)."""
    results = compile_all(jobs)
    report = case_report(arch, cases, results)
    print("\n".join(report))
    over = [line for line, r in zip(report, results) if r["shared"] > SMEM_LIMIT[arch]]
    assert not over, "over the shared-memory limit:\n" + "\n".join(over)
    return report, results


def compile_all(jobs) -> list:
    """Compiles every job in one subprocess; returns per job {"wgmma": count of wgmma
    instructions in the PTX, "cp_async": count of cp.async (TMA copies included), "tma": count of
    tensor-memory-accelerator copies (cp.async.bulk.tensor), "shared": bytes of shared memory,
    "warps": the warps a program runs (more than num_warps when Triton warp-specializes a loop),
    "warp_specialized": whether it did (ttg.warp_specialize in the TTGIR),
    "serialized": ptxas serialises the wgmma pipeline (C7515), "registers", "spill_bytes",
    "loop_spills": spill loads / stores inside loops} (the last four on sm_90a only; None on other
    archs). Raises with the compiler's error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(jobs), capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile(j):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    mod, name = j["kernel"].split(":")
    kernel = getattr(importlib.import_module(mod), name)
    # constexpr parameters the job leaves out take their defaults (as a launch that omits them)
    defaults = {p.name: p.default for p in inspect.signature(kernel.fn).parameters.values()
                if p.default is not inspect.Parameter.empty and "constexpr" in str(p.annotation)}
    const = {**defaults, **j["constexprs"]}
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in const else j["types"].get(n, j["default"]) for n in params}
    unspecialised = {p.name for p in getattr(kernel, "params", []) if getattr(p, "do_not_specialize", False)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params)
             if sig[n] != "constexpr" and not sig[n].startswith("fp") and n not in unspecialised}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", j["arch"], 32), options=j["options"])
    except Exception as e:
        raise RuntimeError(f"{j}: {e}") from e
    ptx = k.asm["ptx"]
    res = dict(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"),
               tma=ptx.count("cp.async.bulk.tensor"), shared=k.metadata.shared,
               warps=k.metadata.num_warps, warp_specialized="ttg.warp_specialize" in k.asm["ttgir"],
               serialized=None, registers=None, spill_bytes=None, loop_spills=None)
    if j["arch"] == 90:
        res.update(_ptxas_report(ptx), loop_spills=_loop_spills(k.asm["cubin"]))
    return res


def _loop_spills(cubin: bytes) -> int:
    """Spill loads and stores (LDL / STL) inside loops (between a backward branch and its target)
    of a cubin's SASS."""
    import re
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_bundled_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    inside = set()
    for i, (addr, op) in enumerate(ins):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) <= addr:
            inside.update(range(index.get(int(target.group(1), 16), 0), i + 1))
    return sum(1 for j in inside if re.search(r"\b(LDL|STL)\b", ins[j][1]))


def _bundled_tool(name: str) -> str:
    """Path of a CUDA tool (ptxas, cuobjdump) that Triton bundles."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_report(ptx: str) -> dict:
    """ptxas -v on the PTX for sm_90a: wgmma serialisation (C7515), registers, spilled bytes."""
    import re
    import tempfile

    import triton

    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except AttributeError:   # no knobs: the ptxas Triton bundles
        ptxas = _bundled_tool("ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(serialized="C7515" in out, registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root: benchmarks.*
    print(json.dumps([_compile(j) for j in json.loads(sys.stdin.read())]))
