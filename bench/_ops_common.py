"""Shared machinery of the per-op benchmarks (bench/bench_<op>.py).

On a GPU: fastflow's kernel vs torch.compile(reference) vs the eager reference, each timed over many
launches (a CUDA graph of ``LAUNCHES`` calls replayed between two events, or, where the call cannot
be captured, a loop of them between two events: no Python timing per call), GB/s (TFLOP/s for
compute-bound ops such as attention) and % of the detected GPU's peak (``gpu_peaks``); for ops with
a Triton and a CUDA C++ kernel, each of the two too. ``--dry-run``: the bench's tiny cases run the
kernel's planned launch on CPU tensors (under the Triton interpreter) against the reference, so
the harness is known to work before a GPU. Without a GPU: the bytes moved by the fused kernel vs
the unfused eager sequence it replaces, and the roofline time on an H100 (3.35 TB/s, 989 bf16
TFLOP/s), printed as a projection: no time is measured.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3 SXM
H100_BF16_FLOPS = 989e12
LAUNCHES, REPS = 20, 5  # calls per timed graph / loop, and timed replays (median)
COMPUTE_BOUND = 50.0  # FLOPs per byte above which a case is reported in TFLOP/s, not GB/s

# Dense peaks per GPU, matched by name (first match wins): bf16 and FP8 TFLOP/s, HBM/GDDR TB/s.
PEAKS = (
    ("H200", {"bf16_tflops": 989.0, "fp8_tflops": 1979.0, "tbps": 4.8}),
    ("H100 PCIe", {"bf16_tflops": 756.0, "fp8_tflops": 1513.0, "tbps": 2.0}),
    ("H100", {"bf16_tflops": 989.0, "fp8_tflops": 1979.0, "tbps": 3.35}),
    ("A100-SXM4-40GB", {"bf16_tflops": 312.0, "fp8_tflops": None, "tbps": 1.555}),
    ("A100", {"bf16_tflops": 312.0, "fp8_tflops": None, "tbps": 2.039}),
    ("L40S", {"bf16_tflops": 362.0, "fp8_tflops": 733.0, "tbps": 0.864}),
    ("4090", {"bf16_tflops": 165.0, "fp8_tflops": 330.0, "tbps": 1.008}),
)


def gpu_peaks(name: str | None) -> dict:
    """The peaks of the GPU called ``name`` (``torch.cuda.get_device_name()``), or ``{"gpu_class":
    "unknown"}`` (then no % of peak is reported)."""
    for key, peaks in PEAKS:
        if name and key.lower() in name.lower():
            return {"gpu_class": key, **peaks}
    return {"gpu_class": "unknown"}


def pct_of_peak(value: float, peak: float | None) -> float | None:
    """``value`` as % of ``peak`` (same unit), or None where the peak is unknown."""
    return round(100.0 * value / peak, 1) if peak else None


def gpu_time(fn, args=(), launches: int = LAUNCHES, reps: int = REPS) -> tuple[float, str]:
    """Seconds per call of ``fn(*args)`` on the GPU, and how they were timed: ``launches`` calls
    captured in one CUDA graph, replayed ``reps`` times between two events ("graph"); where the call
    cannot be captured (a host sync, an uncapturable allocation), ``launches`` calls in a loop
    between two events ("loop"). The median replay over ``launches``."""
    for _ in range(3):  # compile, autotune, allocator warm
        fn(*args)
    torch.cuda.synchronize()
    run, how = None, "graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn(*args)
        run = graph.replay
        run()
        torch.cuda.synchronize()
    except Exception:  # not capturable: time a loop of launches instead
        torch.cuda.synchronize()
        how = "loop"

        def run():
            for _ in range(launches):
                fn(*args)

    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times), how


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


def _rate(case: Case, seconds: float, peaks: dict) -> dict:
    """TFLOP/s for compute-bound cases (attention), GB/s for the rest, with % of the GPU's peak."""
    if case.flops and case.flops / max(case.fused_bytes, 1) > COMPUTE_BOUND:
        tflops = case.flops / seconds / 1e12
        return {"fastflow_TFLOPs": tflops, "pct_peak": pct_of_peak(tflops, peaks.get("bf16_tflops")),
                "metric": "TFLOP/s"}  # fmt: skip
    gbs = case.fused_bytes / seconds / 1e9
    return {"fastflow_GBps": gbs, "pct_peak": pct_of_peak(gbs, peaks.get("tbps", 0) * 1e3), "metric": "GB/s"}


def run_gpu(op_name: str, fastflow_fn, reference_fn, cases: list[Case], meta: dict, dtype) -> list[dict]:
    import fastflow.ops as ops

    rows, gpu = [], torch.cuda.get_device_name()
    peaks = gpu_peaks(gpu)
    compiled = torch.compile(reference_fn, dynamic=False)
    print(f"{op_name} on {gpu} ({dtype}; {peaks['gpu_class']}), {LAUNCHES} launches per timing")
    for case in cases:
        args = case.make("cuda", dtype)
        with ops.use_backend("kernels"):
            t_ff, how = gpu_time(fastflow_fn, args)
        timings = {}
        for label, fn in (("compile", compiled), ("eager", reference_fn)):
            try:
                timings[f"{label}_ms"] = gpu_time(fn, args)[0] * 1e3
            except Exception as e:  # a baseline that fails is reported, the kernel row stays
                timings[f"{label}_error"] = f"{type(e).__name__}: {e}"[:200]
        # each kernel backend of the op on its own (Triton vs CUDA C++), where there are two
        impls = ops.OPS[op_name].impls if op_name in ops.OPS else {}
        if len(impls) > 1:
            for backend in impls:
                with ops.use_backend(backend):
                    timings[f"{backend}_ms"] = gpu_time(fastflow_fn, args)[0] * 1e3
        rate = _rate(case, t_ff, peaks)
        row = {**meta, "gpu": gpu, **peaks, "case": case.name, "timer": how, "launches": LAUNCHES,
               "fastflow_ms": t_ff * 1e3, **rate, **timings}  # fmt: skip
        if "compile_ms" in timings:
            row["speedup_vs_compile"] = timings["compile_ms"] / (t_ff * 1e3)
        rows.append(row)
        value = rate.get("fastflow_TFLOPs", rate.get("fastflow_GBps"))
        each = "".join(f"  {k[:-3]} {v:8.3f} ms" for k, v in timings.items() if k.endswith("_ms"))
        print(f"  {case.name:32s} fastflow {t_ff * 1e3:8.3f} ms ({value:7.1f} {rate['metric']}, "
              f"{rate['pct_peak']}% of peak){each}", flush=True)  # fmt: skip
    return rows


def faithful_interpreter() -> None:
    """The kernel tests' compatibility layer (tests/kernels/interp_compat.py): the bare interpreter
    drops the rounding carry of casts to FP8 (127.3 -> 64), so a dry run would report a kernel
    error that the GPU does not make."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.kernels import interp_compat

    interp_compat.install()


def run_dry(op_name: str, reference_fn, cases: list[Case], plan, meta: dict) -> list[dict]:
    """Tiny cases on CPU tensors: the kernel's planned launch (the Triton interpreter where
    TRITON_INTERPRET=1) against the reference, timed once with the wall clock (not a measurement).
    No tiny cases: the plan on meta tensors only."""
    faithful_interpreter()
    rows = []
    for case in cases:
        args = case.make("cpu", torch.float32)
        start = time.perf_counter()
        got = plan(*args)()
        seconds = time.perf_counter() - start
        want = reference_fn(*args)
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        err = max(((g.float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=False)), default=0)
        rows.append({**meta, "gpu": None, "dry_run": True, "case": case.name, "wall_s": seconds,
                     "max_abs_err": err, "fused_bytes": case.fused_bytes})  # fmt: skip
        print(f"{op_name} dry run  {case.name:24s} kernel {seconds:6.2f} s (CPU)  max abs err vs reference {err:.2e}")
    if not cases:
        rows.append({**meta, "gpu": None, "dry_run": "meta", "case": None})
        print(f"{op_name} dry run: no tiny cases; launches planned on meta tensors only")
    return rows


def run(op_name: str, fastflow_fn, reference_fn, cases: list[Case], dtype=torch.bfloat16) -> list[dict]:
    rows = []
    meta = {"op": op_name, "git": git_sha(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        return run_gpu(op_name, fastflow_fn, reference_fn, cases, meta, dtype)
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


def main(op_name: str, fastflow_fn, reference_fn, cases: list[Case], plan, tiny: list[Case] | None = None) -> None:
    """The command line of every bench_<op>.py: run the cases, optionally append JSON rows.
    ``plan``: the kernel module's launch planner, which gives the fused bytes. ``tiny``: small cases
    for ``--dry-run`` (CPU tensors, the Triton interpreter)."""
    import argparse

    parser = argparse.ArgumentParser(description=f"{op_name} benchmark (GPU timing, or a projection without one)")
    parser.add_argument("--json", default=None, help="append result rows to this JSON-lines file")
    parser.add_argument("--dry-run", action="store_true", help="tiny cases on CPU (TRITON_INTERPRET=1), no timing")
    args = parser.parse_args()
    cases = with_plan(cases, plan)
    if args.dry_run:
        meta = {"op": op_name, "git": git_sha(), "torch": torch.__version__, "python": platform.python_version()}
        rows = run_dry(op_name, reference_fn, with_plan(tiny or [], plan, torch.float32), plan, meta)
    else:
        rows = run(op_name, fastflow_fn, reference_fn, cases)
    write_json(rows, args.json)
