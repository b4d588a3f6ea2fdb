"""The GPU run book, run once on the first machine with an NVIDIA GPU, as one command inside a time
budget (default 480 s on one H100; bench/README.md, "GPU run book"):

    python bench/gpu_run.py --out gpu_run.jsonl [--budget-s 480] [--only tune kernels-attention]
    python bench/gpu_run.py --dry-run --out dry.jsonl      # every step, tiny, on this CPU machine

Steps, each in its own process (an illegal address in one cannot poison the next) with a timeout:
``tune`` first (``fastflow tune`` writes its table in fastflow's cache root, so the benches and
models after it dispatch by its choice); ``tests-gpu-*``: pytest of the kernel and op tests with
TRITON_INTERPRET=0 on GPU tensors (the FP8 ones on their own); ``kernels-<op>``: every
``bench/bench_<op>.py`` (found by name, timed over many launches, % of the GPU's peak); then the
whole-model rows ``e2e-flux-dev-*``, ``e2e-sd35-large-*``, ``e2e-sdxl-*`` (bench/e2e.py).

Budget rule: every step has a planned GPU time (seconds on an H100, process start included) and a
priority (PRIORITY, most informative first). Steps are kept in priority order while their planned
times fit in --budget-s; a step that does not fit is dropped, smaller ones after it may still fit.
Each step's timeout is twice its plan plus 30 s, never past the budget's end; a step with less than
half its plan left is skipped. One JSON line per step to --out (``step``, ``returncode``,
``planned_gpu_s``, ``seconds``, ``results``), then a Markdown table (stdout and OUT.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import gpu_report  # noqa: E402

# Most informative first: what decides "is fastflow faster than diffusers on the flagship model, and
# are its kernels right on silicon", then the other models and the remaining ops. A kernels-<op>
# bench not listed (a new op) ranks with the other kernels.
PRIORITY = [
    "tune",
    "e2e-flux-dev-diffusers",
    "e2e-flux-dev-fastflow",
    "kernels-attention",
    "tests-gpu-fp8",
    "kernels-fp8_linear",
    "e2e-flux-dev-fastflow-compile",
    "tests-gpu-kernels",
    "e2e-sd35-large-fastflow",
    "e2e-sd35-large-diffusers",
    "kernels-groupnorm_silu",
    "kernels-layernorm_modulate",
    "kernels-qk_norm_rope",
    "kernels-gated_residual_layernorm_modulate",
    "e2e-sdxl-unet",
    "e2e-sdxl-vae",
    "kernels-*",
    "e2e-sd35-large-fastflow-compile",
    "tests-gpu-ops",
    "e2e-sdxl-compile",
]
BENCH_PLAN_S = {"attention": 45, "fp8_linear": 30}  # other kernels-<op>: 20 s
FP8_TESTS = ["tests/kernels/test_fp8.py", "tests/ops/test_fp8.py"]
# e2e step -> (bench/e2e.py model, variants, planned GPU s)
E2E = {
    "e2e-flux-dev-diffusers": ("flux-dev", "diffusers,diffusers-compile", 90),
    "e2e-flux-dev-fastflow": ("flux-dev", "fastflow,fastflow-fp8,fastflow-fp8-cache", 60),
    "e2e-flux-dev-fastflow-compile": ("flux-dev", "fastflow-compile", 80),
    "e2e-sd35-large-diffusers": ("sd3.5-large", "diffusers,diffusers-compile", 80),
    "e2e-sd35-large-fastflow": ("sd3.5-large", "fastflow,fastflow-fp8,fastflow-fp8-cache", 50),
    "e2e-sd35-large-fastflow-compile": ("sd3.5-large", "fastflow-compile", 70),
    "e2e-sdxl-unet": ("sdxl-base", "diffusers,fastflow", 30),
    "e2e-sdxl-vae": ("sdxl-vae", "diffusers,fastflow", 25),
    "e2e-sdxl-compile": ("sdxl-base", "diffusers-compile,fastflow-compile", 70),
}


@dataclass
class Step:
    name: str
    cmd: list[str]
    planned_gpu_s: float
    results: str | None = None  # "jsonl": rows appended to {out}; "json": one JSON document; None: output tail
    selected: bool = True
    env: dict = field(default_factory=dict)

    @property
    def priority(self) -> int:
        if self.name in PRIORITY:
            return PRIORITY.index(self.name)
        return PRIORITY.index("kernels-*") if self.name.startswith("kernels-") else len(PRIORITY)


def _pytest(paths: list[str], ignore: list[str], dry: bool) -> list[str]:
    """pytest of ``paths`` (the dry run collects them only: the interpreter runs them in the test suite)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *paths]
    return cmd + [f"--ignore={p}" for p in ignore] + (["--collect-only"] if dry else [])


def plan_steps(dry: bool) -> list[Step]:
    """Every step of the run book in execution order (tune, tests, kernels, whole models)."""
    py, flag = sys.executable, ["--dry-run"] if dry else []
    tune = (
        [py, "-m", "fastflow", "tune", "--json", "{out}"]
        if not dry
        else [py, str(HERE / "gpu_report.py"), "tune-dry", "{out}"]
    )
    steps = [Step("tune", tune, 45, "json")]
    others = [p for p in FP8_TESTS if p.startswith("tests/kernels")]
    steps.append(Step("tests-gpu-fp8", _pytest(FP8_TESTS, [], dry), 40))
    steps.append(Step("tests-gpu-kernels", _pytest(["tests/kernels"], others, dry), 120))
    steps.append(Step("tests-gpu-ops", _pytest(["tests/ops"], ["tests/ops/test_fp8.py"], dry), 60))
    for bench in sorted(HERE.glob("bench_*.py")):
        op = bench.stem.removeprefix("bench_")
        if op != "load":  # loading is a CPU / disk benchmark
            steps.append(
                Step(f"kernels-{op}", [py, str(bench), "--json", "{out}", *flag], BENCH_PLAN_S.get(op, 20), "jsonl")
            )
    for name, (model, variants, planned) in E2E.items():
        cmd = [py, str(HERE / "e2e.py"), "--model", model, "--variants", variants, "--json", "{out}", *flag]
        steps.append(Step(name, cmd, planned, "jsonl"))
    return steps


def select(steps: list[Step], budget_s: float) -> float:
    """Mark the steps the budget keeps (priority order, each kept while it fits); returns their planned sum."""
    total = 0.0
    for step in sorted(steps, key=lambda s: s.priority):
        step.selected = total + step.planned_gpu_s <= budget_s
        total += step.planned_gpu_s if step.selected else 0.0
    return total


def _read_results(step: Step, path: Path, output: str):
    if step.results and path.exists() and path.stat().st_size:
        text = path.read_text()
        if step.results == "json":
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    lines = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|tests? collected)", ln)]
    return {"summary": lines[-1].strip("= ")} if lines else None


def run_step(step: Step, timeout: float, env: dict, workdir: Path) -> dict:
    out = workdir / f"{step.name}.out"
    cmd = [c.replace("{out}", str(out)) for c in step.cmd]
    print(f"== {step.name} (planned {step.planned_gpu_s:.0f} s, timeout {timeout:.0f} s): {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the step's whole process group, compile workers included
        output, _ = proc.communicate()
        rc = "timeout"
    print(output[-4000:], flush=True)
    row = {"step": step.name, "returncode": rc, "planned_gpu_s": step.planned_gpu_s,
           "seconds": round(time.perf_counter() - start, 2), "timeout_s": round(timeout),
           "selected": step.selected}  # fmt: skip
    try:
        row["results"] = _read_results(step, out, output)
    except (OSError, ValueError) as e:
        row["results"], row["results_error"] = None, f"{type(e).__name__}: {e}"
    if rc != 0:
        row["output_tail"] = output[-2000:]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_run.jsonl")
    parser.add_argument("--budget-s", type=float, default=480.0, help="GPU seconds for the whole run (default 480)")
    parser.add_argument("--only", nargs="*", default=None, help="step names or prefixes, e.g. tune kernels-attention")
    parser.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    steps = plan_steps(args.dry_run)
    if args.only:
        names = {s.name for s in steps}  # a step's own name picks it alone, else a prefix picks a group
        steps = [s for s in steps if any(s.name == o if o in names else s.name.startswith(o) for o in args.only)]
    planned = select(steps, args.budget_s)
    with tempfile.TemporaryDirectory(prefix="gpu_run_") as tmp:
        if args.dry_run:
            env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", FASTFLOW_CACHE_DIR=str(Path(tmp) / "cache"))
        else:
            import torch

            if not torch.cuda.is_available():
                print("bench/gpu_run.py needs a CUDA GPU visible to torch (or --dry-run)", file=sys.stderr)
                return 2
            env["TRITON_INTERPRET"] = "0"
            print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
        print(f"{sum(s.selected for s in steps)} of {len(steps)} steps fit the {args.budget_s:.0f} s budget "
              f"(planned {planned:.0f} s)", flush=True)  # fmt: skip
        deadline = time.monotonic() + args.budget_s
        rows = []
        for step in steps:
            left = deadline - time.monotonic()
            if not args.dry_run and not step.selected:
                row = {"step": step.name, "returncode": None, "planned_gpu_s": step.planned_gpu_s, "dropped": "budget"}
            elif not args.dry_run and left < step.planned_gpu_s / 2:
                row = {
                    "step": step.name,
                    "returncode": None,
                    "planned_gpu_s": step.planned_gpu_s,
                    "dropped": "time left",
                }
            else:
                timeout = 2 * step.planned_gpu_s + 30
                row = run_step(step, timeout if args.dry_run else max(10.0, min(timeout, left)), env, Path(tmp))
            rows.append(row)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    table = gpu_report.markdown(rows, args.budget_s, planned, args.dry_run)
    print(table)
    out.with_suffix(".md").write_text(table)
    failed = [r["step"] for r in rows if r.get("returncode") not in (0, None)]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
