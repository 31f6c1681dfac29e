"""AOT compilation like tests/triton_aot.py, but with the specialisation a real launch gets: the
runtime marks 16-byte-aligned pointers and integer arguments divisible by 16 (``tt.divisibility``),
which is what lets Triton vectorise loads into cp.async and software-pipeline the loops
(num_stages buffers in shared memory). Without it (tests/triton_aot.py) the loads stay in
registers and the reported shared memory is far below what the GPU needs. Every non-constexpr,
non-float argument is marked divisible: the aligned, pipelined build, the largest one."""
import inspect
import json
import os
import subprocess
import sys

SELF = os.path.abspath(__file__)


def compile_all(jobs) -> list:
    """jobs: dicts from tests/triton_aot.job. Returns per job {"wgmma", "cp_async", "shared"}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, SELF], input=json.dumps(jobs), capture_output=True, text=True, env=env,
                          timeout=1800)
    if proc.returncode != 0:
        raise AssertionError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile(j):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    mod, name = j["kernel"].split(":")
    kernel = getattr(importlib.import_module(mod), name)
    const = j["constexprs"]
    params = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in const else j["types"].get(n, j["default"]) for n in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(params)
             if sig[n] != "constexpr" and not sig[n].startswith("fp")}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", j["arch"], 32), options=j["options"])
    except Exception as e:
        raise RuntimeError(f"{j}: {e}") from e
    ptx = k.asm["ptx"]
    return dict(wgmma=ptx.count("wgmma.mma_async"), cp_async=ptx.count("cp.async"), shared=k.metadata.shared)


if __name__ == "__main__":
    print(json.dumps([_compile(j) for j in json.loads(sys.stdin.read())]))
