"""Shared machinery of the per-op benchmarks (bench/bench_<op>.py).

On a GPU: fastflow's kernel vs torch.compile(reference) vs the eager reference, median time, GB/s
and % of the GPU's peak bandwidth; for ops with a Triton and a CUDA C++ kernel, each of the two
too. Without a GPU: the bytes moved by the fused kernel vs the unfused eager sequence it replaces,
and the roofline time on an H100 (3.35 TB/s, 989 bf16 TFLOP/s), printed as a projection: no time
is measured.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 SXM
H100_BF16_FLOPS = 989e12


@dataclass
class Case:
    """One shape: ``make()`` builds the inputs on a device; byte counts are for that dtype."""

    name: str
    make: object  # (device, dtype) -> tuple of args
    unfused_bytes: int  # a model of the eager sequence the op replaces (diffusers' ops), per bench
    unfused_kernels: int
    flops: int = 0
    fused_bytes: int = 0  # filled in from the kernel's own planned launch (see with_plan)


def with_plan(cases: list[Case], plan, dtype=torch.bfloat16) -> list[Case]:
    """Set each case's fused bytes to what the kernel module's ``plan`` reads and writes for the
    case's inputs (on meta tensors): a kernel fact read off the kernel, not counted by hand."""
    for case in cases:
        case.fused_bytes = plan(*case.make("meta", dtype)).bytes_moved
    return cases


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _time(fn, args, reps: int = 50) -> float:
    for _ in range(5):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def run(op_name: str, fastflow_fn, reference_fn, cases: list[Case], dtype=torch.bfloat16) -> list[dict]:
    rows = []
    meta = {"op": op_name, "git": git_sha(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        import fastflow.ops as ops

        gpu = torch.cuda.get_device_name()
        compiled = torch.compile(reference_fn)
        print(f"{op_name} on {gpu} ({dtype})")
        for case in cases:
            args = case.make("cuda", dtype)
            with ops.use_backend("kernels"):
                t_ff = _time(fastflow_fn, args)
            t_c, t_e = _time(compiled, args), _time(reference_fn, args)
            # each kernel backend of the op on its own (Triton vs CUDA C++), where there are two
            backends = {}
            impls = ops.OPS[op_name].impls if op_name in ops.OPS else {}
            if len(impls) > 1:
                for backend in impls:
                    with ops.use_backend(backend):
                        backends[f"{backend}_ms"] = _time(fastflow_fn, args) * 1e3
            gbs = case.fused_bytes / t_ff / 1e9
            row = {
                **meta,
                "gpu": gpu,
                "case": case.name,
                "fastflow_ms": t_ff * 1e3,
                "compile_ms": t_c * 1e3,
                "eager_ms": t_e * 1e3,
                "fastflow_GBps": gbs,
                **backends,
            }
            rows.append(row)
            each = "".join(f"  {k[:-3]} {v:8.3f} ms" for k, v in backends.items())
            print(
                f"  {case.name:32s} fastflow {t_ff * 1e3:8.3f} ms ({gbs:7.1f} GB/s)  compile {t_c * 1e3:8.3f} ms  "
                f"eager {t_e * 1e3:8.3f} ms{each}"
            )
    else:
        print(
            f"{op_name}: no GPU here, so NO TIME WAS MEASURED. Projection from bytes moved ({dtype}) at the H100's "
            f"{H100_BANDWIDTH / 1e12:.2f} TB/s:"
        )
        print(
            f"  {'case':32s} {'fused MB':>9} {'unfused MB':>11} {'kernels':>8} {'saved':>6} "
            f"{'fused us':>9} {'unfused us':>11}"
        )
        for case in cases:
            compute = case.flops / H100_BF16_FLOPS  # roofline: the slower of traffic and math
            t_f = max(case.fused_bytes / H100_BANDWIDTH, compute)
            t_u = max(case.unfused_bytes / H100_BANDWIDTH, compute)
            row = {
                **meta,
                "gpu": None,
                "case": case.name,
                "fused_bytes": case.fused_bytes,
                "unfused_bytes": case.unfused_bytes,
                "unfused_kernels": case.unfused_kernels,
                "projected_fused_us_h100": t_f * 1e6,
                "projected_unfused_us_h100": t_u * 1e6,
                "flops": case.flops,
            }
            rows.append(row)
            print(
                f"  {case.name:32s} {case.fused_bytes / 1e6:9.1f} {case.unfused_bytes / 1e6:11.1f} "
                f"{case.unfused_kernels:>5}->1 {1 - case.fused_bytes / case.unfused_bytes:6.0%} "
                f"{t_f * 1e6:9.1f} {t_u * 1e6:11.1f}"
            )
    return rows


def write_json(rows: list[dict], path: str | None) -> None:
    if path:
        with open(path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def main(op_name: str, fastflow_fn, reference_fn, cases: list[Case], plan) -> None:
    """The command line of every bench_<op>.py: run the cases, optionally append JSON rows.
    ``plan``: the kernel module's launch planner, which gives the fused bytes."""
    cases = with_plan(cases, plan)
    import argparse

    parser = argparse.ArgumentParser(description=f"{op_name} benchmark (GPU timing, or a projection without one)")
    parser.add_argument("--json", default=None, help="append result rows to this JSON-lines file")
    write_json(run(op_name, fastflow_fn, reference_fn, cases), parser.parse_args().json)
