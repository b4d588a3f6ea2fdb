"""FP8 linear layers at FLUX.1-dev's shapes (1024x1024: 4096 image + 512 text tokens).

On a GPU: time of the bf16 nn.Linear (cuBLAS), torch._scaled_mm (cuBLASLt FP8) and fastflow's
quantize + FP8 GEMM kernels. Without one (this machine), NO GPU TIME IS MEASURED: it reports
the bytes each path moves (from the kernels' own planned launches) and the roofline time on an
H100 SXM (3.35 TB/s; 989 dense bf16 / 1979 dense FP8 TFLOP/s), and measures on the CPU, for
honesty, what the reference path costs there (one thread, median of --reps): FP8 is for GPUs with
FP8 tensor cores; on a CPU it dequantizes and is slower than a plain fp32 matmul. On a GPU each
path is timed over many launches (bench/_ops_common.gpu_time), in TFLOP/s and % of the GPU's
bf16 / FP8 peak. ``--dry-run``: one tiny layer through the Triton kernels on CPU (interpreter).

    python bench/bench_fp8_linear.py [--json rows.json] [--cpu-tokens 256] [--reps 3] [--dry-run]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial

import torch
from _ops_common import H100_BANDWIDTH, H100_BF16_FLOPS, git_sha, gpu_peaks, gpu_time, pct_of_peak, write_json

from fastflow.kernels.fp8_gemm import LINEAR_SHAPES, plan
from fastflow.kernels.fp8_quantize import plan_quantize

H100_FP8_FLOPS = 1979e12  # dense


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def projection(m: int, k: int, n: int) -> dict:
    flops = 2 * m * k * n
    bf16_bytes = 2 * (m * k + k * n + m * n + n)  # read x, W, bias; write y
    quant = plan_quantize(_meta(m, k, dtype=torch.bfloat16), None, True)
    gemm = plan(
        _meta(m, k, dtype=torch.float8_e4m3fn),
        _meta(m, dtype=torch.float32),
        _meta(n, k, dtype=torch.float8_e4m3fn),
        _meta(n, dtype=torch.float32),
        _meta(n, dtype=torch.bfloat16),
        False,
        torch.bfloat16,
        arch=90,
    )
    fp8_bytes = quant.bytes_moved + gemm.bytes_moved
    t_bf16 = max(bf16_bytes / H100_BANDWIDTH, flops / H100_BF16_FLOPS)
    t_fp8 = quant.bytes_moved / H100_BANDWIDTH + max(gemm.bytes_moved / H100_BANDWIDTH, flops / H100_FP8_FLOPS)
    return {
        "flops": flops,
        "bf16_bytes": bf16_bytes,
        "fp8_bytes": fp8_bytes,
        "weight_bytes_bf16": 2 * k * n,
        "weight_bytes_fp8": k * n + 4 * n,
        "h100_bf16_us": t_bf16 * 1e6,
        "h100_fp8_us": t_fp8 * 1e6,
    }


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cpu_row(m: int, k: int, n: int, reps: int) -> dict:
    from fastflow.ops.fp8 import fp8_linear, scaled_mm_native
    from fastflow.ops.reference import fp8_quantize_ref
    from fastflow.quant import quantize_weight

    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    bias = torch.zeros(n)
    q, scale = quantize_weight(w)
    xq, xs = fp8_quantize_ref(x)
    out = {
        "cpu_fp32_linear_ms": _median_ms(lambda: torch.nn.functional.linear(x, w, bias), reps),
        "cpu_fp8_reference_ms": _median_ms(lambda: fp8_linear(x, q, scale, bias), reps),
    }
    if k % 16 == 0 and n % 16 == 0:
        out["cpu_scaled_mm_ms"] = _median_ms(lambda: scaled_mm_native(xq, xs, q, scale, bias, torch.float32), reps)
    return out


def gpu_rows() -> list[dict]:
    """bf16 nn.Linear (cuBLAS), torch._scaled_mm (cuBLASLt, row-wise scales) and fastflow's FP8 linear
    (quantize + GEMM, through the op as models call it) at FLUX.1-dev's shapes, on this GPU."""
    import fastflow.ops as ops
    from fastflow.ops.fp8 import scaled_mm_native
    from fastflow.ops.reference import fp8_quantize_ref
    from fastflow.quant import quantize_weight

    gpu = torch.cuda.get_device_name()
    peaks, rows = gpu_peaks(gpu), []
    print(f"FP8 linear on {gpu} ({peaks['gpu_class']})")
    for name, (m, k, n) in LINEAR_SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        q, scale = quantize_weight(w)
        xq, xs = fp8_quantize_ref(x, None, True)
        paths = {
            "bf16_linear": partial(torch.nn.functional.linear, x, w, bias),
            "scaled_mm": partial(scaled_mm_native, xq, xs, q, scale, bias, torch.bfloat16),
            "fastflow_fp8_linear": partial(ops.fp8_linear, x, q, scale, bias),
            "fastflow_fp8_gemm": partial(ops.fp8_scaled_mm, xq, xs, q, scale, bias, False, torch.bfloat16),
        }
        row = {"layer": name, "m": m, "k": k, "n": n, "gpu": gpu, **peaks, "measured_gpu": True}
        for label, fn in paths.items():
            try:
                seconds, how = gpu_time(fn)
            except Exception as e:  # one failing path is reported; the others are still timed
                row[f"{label}_error"] = f"{type(e).__name__}: {e}"[:200]
                continue
            tflops = 2 * m * k * n / seconds / 1e12
            peak = peaks.get("bf16_tflops") if label == "bf16_linear" else peaks.get("fp8_tflops")
            row.update({f"{label}_ms": seconds * 1e3, f"{label}_TFLOPs": tflops,
                        f"{label}_pct_peak": pct_of_peak(tflops, peak), "timer": how})  # fmt: skip
        print("  " + f"{name} ({m}, {k}, {n})".ljust(36) + "".join(
            f" {lb} {row[lb + '_ms']:.3f} ms ({row[lb + '_TFLOPs']:.0f} TFLOP/s)" for lb in paths if lb + "_ms" in row
        ), flush=True)  # fmt: skip
        rows.append(dict(row, git=git_sha(), torch=torch.__version__))
    return rows


def dry_rows() -> list[dict]:
    """One tiny layer through the kernels' planned launches on CPU (the interpreter), vs the reference."""
    from _ops_common import faithful_interpreter

    from fastflow.kernels.fp8_gemm import fp8_linear_fwd
    from fastflow.ops.reference import fp8_linear_ref, fp8_quantize_ref

    faithful_interpreter()

    x = torch.randn(2, 9, 96)
    w, w_scale = fp8_quantize_ref(torch.randn(48, 96) * 0.02, None, True)
    start = time.perf_counter()
    got = fp8_linear_fwd(x, w, w_scale, None, None, True, False)
    seconds = time.perf_counter() - start
    err = (got - fp8_linear_ref(x, w, w_scale, None, None, True, False)).abs().max().item()
    print(f"fp8_linear dry run: kernel {seconds:.2f} s (CPU), max abs err vs reference {err:.2e}")
    return [{"layer": "tiny", "dry_run": True, "wall_s": seconds, "max_abs_err": err, "git": git_sha()}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cpu-tokens", type=int, default=256, help="rows of the CPU measurement (0: skip it)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="one tiny layer on CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.dry_run or torch.cuda.is_available():
        write_json(dry_rows() if args.dry_run else gpu_rows(), args.json)
        return 0
    torch.set_num_threads(1)
    rows, total = [], {"bf16": 0.0, "fp8": 0.0}
    print("no GPU here: NO GPU TIME WAS MEASURED. H100 roofline projection from bytes and FLOPs; CPU measured.")
    header = f"{'layer (M, K, N)':>40} {'bf16 MB':>8} {'fp8 MB':>8} {'H100 bf16 us':>12} {'H100 fp8 us':>12}"
    if args.cpu_tokens:
        header += f" {'CPU fp32 ms':>11} {'CPU fp8 ref ms':>14} {'CPU _scaled_mm ms':>17}"
    print(header)
    for name, (m, k, n) in LINEAR_SHAPES.items():
        row = {"layer": name, "m": m, "k": k, "n": n, **projection(m, k, n)}
        line = (
            f"{f'{name} ({m}, {k}, {n})':>40} {row['bf16_bytes'] / 1e6:>8.1f} {row['fp8_bytes'] / 1e6:>8.1f} "
            f"{row['h100_bf16_us']:>12.1f} {row['h100_fp8_us']:>12.1f}"
        )
        if args.cpu_tokens:
            row.update(cpu_row(min(m, args.cpu_tokens), k, n, args.reps), cpu_tokens=min(m, args.cpu_tokens))
            line += (
                f" {row['cpu_fp32_linear_ms']:>11.1f} {row['cpu_fp8_reference_ms']:>14.1f}"
                f" {row.get('cpu_scaled_mm_ms', float('nan')):>17.1f}"
            )
        print(line, flush=True)
        rows.append(dict(row, git=git_sha(), torch=torch.__version__, measured_gpu=False))
    # one FLUX-dev step: 19 double blocks (img + txt streams), 38 single blocks
    per_step = {
        "double qkv": 19,
        "double proj": 19,
        "double mlp.0": 19,
        "double mlp.2": 19,
        "txt qkv": 19,
        "single linear1": 38,
        "single linear2": 38,
        "modulation (double)": 38,
        "modulation (single)": 38,
    }
    for row in rows:
        total["bf16"] += per_step[row["layer"]] * row["h100_bf16_us"]
        total["fp8"] += per_step[row["layer"]] * row["h100_fp8_us"]
    print(
        f"listed layers x their count per FLUX-dev step (text-stream proj/MLP not listed): H100 projection "
        f"{total['bf16'] / 1e3:.1f} ms bf16 -> {total['fp8'] / 1e3:.1f} ms FP8"
    )
    write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
