"""The Markdown summary of a GPU run book (bench/gpu_run.py), and its dry-run ``tune`` step.

python bench/gpu_report.py table gpu_run.jsonl      # the table again, from a run's JSON lines
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _step_result(row: dict) -> str:
    res = row.get("results")
    if row.get("dropped"):
        return f"dropped ({row['dropped']})"
    if isinstance(res, dict):
        return res.get("summary", "")
    if isinstance(res, list):
        return f"{len(res)} rows"
    return (row.get("output_tail") or "").strip().splitlines()[-1][:80] if row.get("returncode") else ""


def markdown(rows: list[dict], budget_s: float, planned_s: float, dry_run: bool) -> str:
    lines = [f"## GPU run book{' (dry run: tiny sizes on CPU, no GPU time measured)' if dry_run else ''}", "",
             f"Budget {budget_s:.0f} s, planned GPU time of the kept steps {planned_s:.0f} s.", "",
             "| step | returncode | planned GPU s | took s | kept by budget | result |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['step']} | {_fmt(r.get('returncode'))} | {r['planned_gpu_s']:.0f} | "
                     f"{_fmt(r.get('seconds'))} | {'yes' if r.get('selected', not r.get('dropped')) else 'no'} | "
                     f"{_step_result(r)} |")  # fmt: skip
    kernels = [(r["step"], x) for r in rows if r["step"].startswith("kernels-") for x in (r.get("results") or [])]
    if kernels:
        lines += [
            "",
            "| op | case | fastflow ms | rate | % peak | compile ms | eager ms | timer |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for step, x in kernels:
            rate = x.get("fastflow_TFLOPs") or x.get("fastflow_GBps")
            unit = "TFLOP/s" if "fastflow_TFLOPs" in x else "GB/s"
            case = x.get("case") or x.get("layer")
            if "fastflow_fp8_linear_ms" in x:  # bench_fp8_linear: one row per layer, several paths
                rate, unit = x.get("fastflow_fp8_linear_TFLOPs"), "TFLOP/s"
                pct = x.get("fastflow_fp8_linear_pct_peak")
                x = dict(x, fastflow_ms=x["fastflow_fp8_linear_ms"], pct_peak=pct,
                         compile_ms=x.get("scaled_mm_ms"), eager_ms=x.get("bf16_linear_ms"))  # fmt: skip
            ms, timer = (
                _fmt(x.get("fastflow_ms", x.get("wall_s"))),
                x.get("timer", "dry run" if x.get("dry_run") else "-"),
            )
            base = f"{_fmt(x.get('compile_ms'))} | {_fmt(x.get('eager_ms'))}"
            lines.append(f"| {step.removeprefix('kernels-')} | {case} | {ms} | {_fmt(rate)} {unit if rate else ''} | "
                         f"{_fmt(x.get('pct_peak'))} | {base} | {timer} |")  # fmt: skip
    e2e = [x for r in rows if r["step"].startswith("e2e-") for x in (r.get("results") or [])]
    if e2e:
        lines += ["", "| model | variant | ms/step | first call s | peak GiB | rel err vs diffusers | cosine |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for x in e2e:
            first = x.get("compile_s", x.get("first_call_s"))
            err = f"{_fmt(x.get('rel_err'))} | {_fmt(x.get('cosine'), 6)}"
            lines.append(f"| {x['model']} | {x['variant']} | {_fmt(x.get('ms_per_step'))} | {_fmt(first)} | "
                         f"{_fmt(x.get('peak_gib'))} | {err} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def tune_dry(out: str) -> None:
    """The tune step of the dry run: fastflow's attention tuning on CPU tensors at a tiny shape, with a
    wall-clock timer, into the run's own cache root (FASTFLOW_CACHE_DIR)."""
    import torch

    from fastflow.ops import attention_backends as ab

    def timer(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    rows = ab.tune(torch.device("cpu"), {"tiny": (2, 32, 64)}, dtypes=(torch.float32,), timer=timer)
    Path(out).write_text(json.dumps(rows))
    print(f"dry-run tune: {len(rows)} rows, table {ab.table_path()}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["tune-dry"]:
        tune_dry(sys.argv[2])
    elif sys.argv[1:2] == ["table"]:
        rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]
        print(markdown(rows, float("nan"), sum(r["planned_gpu_s"] for r in rows if r.get("selected")), False))
    else:
        sys.exit(__doc__)
