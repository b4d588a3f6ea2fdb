"""Compile every shipped Triton kernel configuration ahead of time for NVIDIA GPUs, without a GPU.

For sm_80, sm_89 and sm_90 (and sm_100) it prints registers, spills and shared memory (against the
architecture's limit) per configuration, and whether GEMM-like kernels use wgmma / TMA on sm_90.
Exits non-zero when a shipped configuration fails to compile, spills, or exceeds shared memory.
Runs in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).

    python tools/kernel_report.py [--archs 80 89 90 100] [--json report.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time

SMEM_LIMIT = {80: 166912, 89: 101376, 90: 232448, 100: 232448}  # max dynamic shared memory per block
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
ARCHS_OF_MAJOR = {8: (80, 89), 9: (90, 100)}  # which configs of a per-major table each arch runs


def shipped_configs():
    """(label, kernel, signature, constexprs, options[, archs]) for every configuration the launchers
    use at the real FLUX.1 / SD3.5 / VAE shapes; archs limits per-architecture configs."""
    from fastflow.kernels import (
        attention,
        gated_residual,
        gated_residual_layernorm_modulate,
        gelu_tanh,
        groupnorm_silu,
        layernorm_modulate,
        qk_norm_rope,
    )
    from fastflow.kernels._common import row_block, row_warps

    out = []
    for (major, head_dim), (block_m, block_n, warps, stages) in attention.CONFIGS.items():
        for dt in ("bf16", "fp16"):
            p = DTYPES[dt]
            strides = {f"stride_{t}{a}": "i64" for t in "qkv" for a in ("b", "h", "mn"[t != "q"])}
            out.append(
                (
                    f"attention D={head_dim} {block_m}x{block_n} w{warps} s{stages} {dt}",
                    attention._attention_fwd_kernel,
                    {
                        "q_ptr": p,
                        "k_ptr": p,
                        "v_ptr": p,
                        "o_ptr": p,
                        **strides,
                        "B": "i32",
                        "H": "i32",
                        "M": "i32",
                        "N": "i32",
                        "qk_scale": "fp32",
                    },
                    {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "IEEE": False},
                    {"num_warps": warps, "num_stages": stages},
                    ARCHS_OF_MAJOR[major],
                )
            )
    for dt, p in DTYPES.items():
        for width in (3072, 2432, 1536):  # FLUX, SD3.5-large, SD3.5-medium hidden sizes
            block = row_block(width)
            out.append(
                (
                    f"layernorm_modulate C={width} {dt}",
                    layernorm_modulate._layernorm_modulate_fwd_kernel,
                    {
                        "x_ptr": p,
                        "shift_ptr": p,
                        "scale_ptr": p,
                        "out_ptr": p,
                        "stride_xb": "i64",
                        "stride_xl": "i64",
                        "L": "i32",
                        "C": "i32",
                        "eps": "fp32",
                    },
                    {"BLOCK_C": block},
                    {"num_warps": row_warps(block)},
                )
            )
            out.append(
                (
                    f"gated_residual_layernorm_modulate C={width} {dt}",
                    gated_residual_layernorm_modulate._gated_residual_layernorm_modulate_fwd_kernel,
                    {
                        "x_ptr": p,
                        "gate_ptr": p,
                        "y_ptr": p,
                        "shift_ptr": p,
                        "scale_ptr": p,
                        "r_ptr": p,
                        "h_ptr": p,
                        "L": "i32",
                        "C": "i32",
                        "eps": "fp32",
                    },
                    {"BLOCK_C": block},
                    {"num_warps": row_warps(block)},
                )
            )
            out.append(
                (
                    f"gated_residual C={width} {dt}",
                    gated_residual._gated_residual_fwd_kernel,
                    {"x_ptr": p, "gate_ptr": p, "y_ptr": p, "out_ptr": p, "L": "i32", "C": "i32"},
                    {"BLOCK_C": block},
                    {"num_warps": row_warps(block)},
                )
            )
        out.append(
            (
                f"gelu_tanh {dt}",
                gelu_tanh._gelu_tanh_fwd_kernel,
                {"x_ptr": p, "bias_ptr": p, "out_ptr": p, "N": "i32", "WIDTH": "i32"},
                {"BLOCK": gelu_tanh.BLOCK, "HAS_BIAS": False},
                {"num_warps": 4},
            )
        )
        out.append(
            (
                f"bias_gelu_tanh {dt}",
                gelu_tanh._gelu_tanh_fwd_kernel,
                {"x_ptr": p, "bias_ptr": p, "out_ptr": p, "N": "i32", "WIDTH": "i32"},
                {"BLOCK": gelu_tanh.BLOCK, "HAS_BIAS": True},
                {"num_warps": 4},
            )
        )
        for channels in (128, 256, 512):  # VAE decoder widths, 32 groups
            cg = channels // 32
            block_hw = max(16, 2048 // cg)
            out.append(
                (
                    f"groupnorm_silu C={channels} {dt}",
                    groupnorm_silu._groupnorm_silu_fwd_kernel,
                    {
                        "x_ptr": p,
                        "w_ptr": p,
                        "b_ptr": p,
                        "out_ptr": p,
                        "stride_xb": "i64",
                        "stride_c": "i64",
                        "stride_hw": "i64",
                        "C": "i32",
                        "HW": "i32",
                        "num_groups": "i32",
                        "eps": "fp32",
                    },
                    {"CG": cg, "BLOCK_CG": cg, "BLOCK_HW": block_hw},
                    {"num_warps": 4},
                )
            )
        for head_dim, norm, rope in ((128, True, True), (64, True, False), (64, False, False)):
            out.append(
                (
                    f"qk_norm_rope D={head_dim} norm={norm} rope={rope} {dt}",
                    qk_norm_rope._qk_norm_rope_fwd_kernel,
                    {
                        "qkv_ptr": p,
                        "q_scale_ptr": p,
                        "k_scale_ptr": p,
                        "cos_ptr": "*fp32",
                        "sin_ptr": "*fp32",
                        "q_ptr": p,
                        "k_ptr": p,
                        "v_ptr": p,
                        "stride_qkv_b": "i64",
                        "stride_qkv_l": "i64",
                        "L": "i32",
                        "H": "i32",
                        "eps": "fp32",
                    },
                    {"D": head_dim, "HAS_NORM": norm, "ROPE": rope},
                    {"num_warps": 1 if head_dim <= 64 else 2},
                )
            )
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


def compile_config(kernel, signature, constexprs, options, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: signature.get(name, "constexpr") for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(kernel.arg_names) if sig[a].startswith("*")}
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    log, t0 = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(kernel, sig, dict(constexprs), attrs),
                target=GPUTarget("cuda", arch, 32),
                options=dict(options),
            )
    except Exception as e:  # a compile failure is a row of the report, not a crash
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"}
    res = _ptxas(log.getvalue())
    res["spills"] = res.pop("spill_stores", 0) + res.pop("spill_loads", 0)
    res["smem"] = compiled.metadata.shared
    res["wgmma"] = "wgmma.mma_async" in compiled.asm["ptx"]
    res["tma"] = "cp.async.bulk.tensor" in compiled.asm["ptx"]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["ok"] = res["spills"] == 0 and res["smem"] <= SMEM_LIMIT[arch]
    if not res["ok"]:
        res["error"] = f"spills {res['spills']} B" if res["spills"] else f"smem {res['smem']} > {SMEM_LIMIT[arch]}"
    return res


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("kernel_report: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", type=int, nargs="+", default=[80, 89, 90])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows, failed = [], 0
    print(f"{'kernel configuration':48s} {'arch':>6} {'regs':>5} {'spills':>7} {'smem':>14} {'notes'}")
    for label, kernel, sig, constexprs, options, *only in shipped_configs():
        for arch in (a for a in args.archs if not only or a in only[0]):
            r = compile_config(kernel, sig, constexprs, options, arch)
            rows.append({"config": label, "arch": arch, **r})
            failed += not r["ok"]
            if "smem" in r:
                notes = ",".join(k for k in ("wgmma", "tma") if r.get(k)) + ("" if r["ok"] else " FAIL " + r["error"])
                print(
                    f"{label:48s} sm_{arch:<3} {r.get('regs', '?'):>5} {r['spills']:>7} "
                    f"{r['smem']:>6}/{SMEM_LIMIT[arch]:<7} {notes}",
                    flush=True,
                )
            else:
                print(f"{label:48s} sm_{arch:<3} FAIL {r['error']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows) - failed} of {len(rows)} configurations compile without spills within shared memory")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
