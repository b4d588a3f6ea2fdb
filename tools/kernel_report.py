"""Compile every shipped Triton kernel configuration ahead of time for NVIDIA GPUs, without a GPU.

The configurations are not listed here: every kernel module named in the op registry
(``fastflow.ops.OPS``) plans its launches at the real FLUX.1 / SD3.5 / VAE shapes (``shipped(arch)``
on meta tensors), and each planned launch is compiled with the signature, constants and
divisibility attributes that Triton's own run-time specialization gives those arguments (16-byte
aligned pointers assumed, as torch allocations are). For sm_80, sm_89, sm_90, sm_100 and sm_120
it prints registers, spills and shared memory (against the architecture's limit) per
configuration, and whether kernels use wgmma / TMA (sm_90) or tcgen05 (sm_100). Exits non-zero
when a shipped configuration fails to compile, spills, or exceeds shared memory. Runs in a process
without TRITON_INTERPRET.

Then the CUDA C++ kernels of csrc/ (:func:`cuda_rows`): each compiled by nvcc for sm_80, sm_89,
sm_90a (and sm_100a / sm_120 where the toolkit has them) with ``-Xptxas -v``, and disassembled with
cuobjdump to check that the kernels of ``VECTORIZED`` move global memory in 128-bit instructions.

    python tools/kernel_report.py [--archs 80 89 90 100 120] [--only attention] [--json report.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
import time

# max dynamic shared memory per block (opt-in), by compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def shipped_configs(archs, only=None):
    """(label, arch, kernel, signature, constexprs, attrs, options), one per distinct specialization."""
    from fastflow.kernels._common import specialize
    from fastflow.ops._registry import kernel_modules

    seen, out = set(), []
    for name in kernel_modules():
        module = importlib.import_module(name)
        for arch in archs:
            for label, launch in module.shipped(arch):
                if only and not any(o in label for o in only):
                    continue
                signature, constexprs, attrs, options = specialize(launch, arch)
                opts = {k: getattr(options, k) for k in ("num_warps", "num_stages", "num_ctas")}
                key = (arch, launch.kernel.fn.__qualname__, repr(signature), repr(constexprs), repr(attrs), repr(opts))
                if key not in seen:
                    seen.add(key)
                    out.append((label, arch, launch.kernel, signature, constexprs, attrs, options))
    return out


def _ptxas(log: str) -> dict:
    found = {}
    for key, pattern in (
        ("regs", r"Used (\d+) registers"),
        ("spill_stores", r"(\d+) bytes spill stores"),
        ("spill_loads", r"(\d+) bytes spill loads"),
    ):
        values = re.findall(pattern, log)
        if values:
            found[key] = max(int(v) for v in values)
    return found


def _vector_widths(ptx: str) -> tuple[str, str]:
    """The widest global load and store, in bits per instruction (e.g. 128 for ld.global.v4.b32),
    '-' when the kernel has none (TMA moves bulk tensors instead)."""
    widths = {"ld": 0, "st": 0}
    for op, vec, bits in re.findall(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(?:\.v(\d))?\.[a-z]+(\d+)\b", ptx):
        widths[op] = max(widths[op], int(vec or 1) * int(bits))
    return tuple(str(widths[k]) if widths[k] else "-" for k in ("ld", "st"))


def compile_config(kernel, signature, constexprs, attrs, options, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log, t0 = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options=options.__dict__,
            )
    except Exception as e:  # a compile failure is a row of the report, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"}
    res = _ptxas(log.getvalue())
    res["spills"] = res.pop("spill_stores", 0) + res.pop("spill_loads", 0)
    res["smem"] = compiled.metadata.shared
    res["wgmma"] = "wgmma.mma_async" in compiled.asm["ptx"]
    res["tma"] = "cp.async.bulk.tensor" in compiled.asm["ptx"]
    res["tcgen05"] = "tcgen05" in compiled.asm["ptx"]
    res["ld"], res["st"] = _vector_widths(compiled.asm["ptx"])
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["ok"] = res["spills"] == 0 and res["smem"] <= SMEM_LIMIT[arch]
    if not res["ok"]:
        res["error"] = f"spills {res['spills']} B" if res["spills"] else f"smem {res['smem']} > {SMEM_LIMIT[arch]}"
    return res


# -- CUDA C++ (csrc/) ---------------------------------------------------------------------------------
CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CUDA_ARCH = {80: "80", 89: "89", 90: "90a", 100: "100a", 120: "120"}  # arch-specific targets where they exist
# kernels whose global traffic must be 128-bit vectors (a regression to scalar loads is a failure),
# by name prefix. qk_norm_rope's lanes hold D / 32 values: 128-bit where that is 16 bytes; FLUX's
# D = 128 in bf16 moves 64 bits a lane (its warp still reads 256 contiguous bytes).
VECTORIZED = {
    "ff_groupnorm_stats_": ("LDG",),
    "ff_groupnorm_apply_": ("LDG", "STG"),
    "ff_fp8_quantize_per_token_": ("LDG",),
    "ff_qk_norm_rope_bf16_d8": ("LDG", "STG"),
    "ff_qk_norm_rope_f16_d8": ("LDG", "STG"),
    "ff_qk_norm_rope_f32_d4": ("LDG", "STG"),
    "ff_qk_norm_rope_f32_d8": ("LDG", "STG"),
}


def cuda_tools() -> tuple[str | None, str | None, dict]:
    """nvcc, cuobjdump and an environment where cuobjdump finds nvdisasm: the machine's, else the
    nvidia-cuda-cuobjdump / -nvdisasm wheels' (the test extra installs them)."""
    import shutil

    env = dict(os.environ)
    cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        with contextlib.suppress(ImportError):
            import nvidia

            for root in nvidia.__path__:
                for sub in sorted(os.listdir(root)):
                    candidate = os.path.join(root, sub, "bin", "cuobjdump")
                    if os.path.exists(candidate):
                        cuobjdump = candidate
                        env["PATH"] = os.path.dirname(candidate) + os.pathsep + env.get("PATH", "")
    return shutil.which("nvcc"), cuobjdump, env


def _cuda_functions(log: str) -> dict[str, dict]:
    """Per kernel: registers, spills, shared memory from ``ptxas -v``."""
    out = {}
    for chunk in log.split("Compiling entry function '")[1:]:
        name = chunk.split("'", 1)[0]
        found = _ptxas(chunk)
        smem = re.search(r"(\d+) bytes smem", chunk)
        out[name] = {
            "regs": found.get("regs", 0),
            "spills": found.get("spill_stores", 0) + found.get("spill_loads", 0),
            "smem": int(smem[1]) if smem else 0,
        }
    return out


def _sass_widths(sass: str) -> dict[str, tuple[int, int]]:
    """Per kernel: the widest global load and store in its SASS (LDG.E.128: 128 bits; LDG.E: 32)."""
    out = {}
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split(None, 1)[0]
        widths = []
        for op in ("LDG", "STG"):
            tokens = re.findall(rf"\b{op}\.[A-Z0-9_.]+", chunk)
            sizes = [128 if ".128" in t else 64 if ".64" in t else 32 for t in tokens]
            widths.append(max(sizes, default=0))
        out[name] = tuple(widths)
    return out


def cuda_rows(archs, only=None) -> list[dict]:
    """Every csrc/ kernel compiled by nvcc for each architecture with ``-Xptxas -v`` (registers,
    spills, shared memory) and disassembled with cuobjdump (the width of its global loads and
    stores). A row fails on spills, a compile error, or a VECTORIZED kernel without 128-bit access."""
    import subprocess
    import tempfile

    nvcc, cuobjdump, env = cuda_tools()
    if nvcc is None or cuobjdump is None:
        missing = "nvcc" if nvcc is None else "cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
        return [{"config": "csrc", "arch": 0, "ok": False, "error": f"{missing} not found"}]
    supported = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(f for f in os.listdir(CSRC) if f.endswith(".cu")):
            for arch in archs:
                target = CUDA_ARCH[arch]
                if f"compute_{target.rstrip('a')}" not in supported:
                    continue
                cubin = os.path.join(tmp, f"{source}.{target}.cubin")
                cmd = [nvcc, "-cubin", "-O3", "-std=c++17", f"-arch=sm_{target}", "-Xptxas", "-v", f"-I{CSRC}"]
                done = subprocess.run([*cmd, os.path.join(CSRC, source), "-o", cubin], capture_output=True, text=True)
                if done.returncode:
                    rows.append({"config": f"cuda {source}", "arch": arch, "ok": False, "error": done.stderr[-300:]})
                    continue
                sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env).stdout
                widths = _sass_widths(sass)
                for name, r in sorted(_cuda_functions(done.stdout + done.stderr).items()):
                    if only and not any(o in name for o in only):
                        continue
                    ld, st = widths.get(name, (0, 0))
                    need = next((ops for prefix, ops in VECTORIZED.items() if name.startswith(prefix)), ())
                    narrow = [op for op, w in (("LDG", ld), ("STG", st)) if op in need and w != 128]
                    row = {"config": f"cuda {name}", "arch": arch, "target": f"sm_{target}", **r,
                           "ld": str(ld or "-"), "st": str(st or "-")}  # fmt: skip
                    row["ok"] = r["spills"] == 0 and r["smem"] <= SMEM_LIMIT[arch] and not narrow
                    if not row["ok"]:
                        row["error"] = f"spills {r['spills']} B" if r["spills"] else f"not 128-bit: {narrow}"
                    rows.append(row)
    return rows


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_report: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 89, 90, 100, 120], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="+", default=None, help="configurations whose label contains one of these")
    args = parser.parse_args(argv)
    rows, failed = [], 0
    print(
        f"{'kernel configuration':58s} {'arch':>6} {'regs':>5} {'spills':>7} {'smem':>14} {'ld/st bits':>10} {'notes'}"
    )
    for label, arch, kernel, signature, constexprs, attrs, options in shipped_configs(args.archs, args.only):
        r = compile_config(kernel, signature, constexprs, attrs, options, arch)
        rows.append({"config": label, "arch": arch, "signature": signature, **r})
        failed += not r["ok"]
        if "smem" in r:
            notes = ",".join(k for k in ("wgmma", "tma", "tcgen05") if r.get(k)) + (
                "" if r["ok"] else " FAIL " + r["error"]
            )
            print(
                f"{label:58s} sm_{arch:<3} {r.get('regs', '?'):>5} {r['spills']:>7} "
                f"{r['smem']:>6}/{SMEM_LIMIT[arch]:<7} {r['ld'] + '/' + r['st']:>10} {notes}",
                flush=True,
            )
        else:
            print(f"{label:58s} sm_{arch:<3} FAIL {r['error']}", flush=True)
    print(
        f"{len(rows) - failed} of {len(rows)} configurations (distinct run-time specializations) compile "
        "without spills within shared memory"
    )
    cuda = cuda_rows(args.archs, args.only)
    cuda_failed = sum(not r["ok"] for r in cuda)
    for r in cuda:
        if "regs" in r:
            note = "" if r["ok"] else " FAIL " + r["error"]
            print(
                f"{r['config']:58s} {r['target']:<6} {r['regs']:>5} {r['spills']:>7} "
                f"{r['smem']:>6}/{SMEM_LIMIT[r['arch']]:<7} {r['ld'] + '/' + r['st']:>10}{note}",
                flush=True,
            )
        else:
            print(f"{r['config']:58s} sm_{r['arch']:<3} FAIL {r['error']}", flush=True)
    print(
        f"{len(cuda) - cuda_failed} of {len(cuda)} CUDA C++ kernels (csrc/, nvcc) compile without spills, "
        "with 128-bit global loads / stores where they are required"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows + cuda, f, indent=1)
    return 1 if failed or cuda_failed else 0


if __name__ == "__main__":
    sys.exit(main())
