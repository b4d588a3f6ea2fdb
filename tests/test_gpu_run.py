"""The GPU run book (bench/gpu_run.py) before it meets a GPU: the budget rule, and a subset of its
dry run (the tune step, one kernels- step, one whole-model e2e step) green on this CPU machine."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import gpu_run  # noqa: E402

PREFIXES = ("tests-gpu", "tune", "kernels-", "e2e-flux-dev", "e2e-sd35-large", "e2e-sdxl")


def test_steps_named_and_ordered_tune_first():
    steps = gpu_run.plan_steps(dry=True)
    names = [s.name for s in steps]
    assert names[0] == "tune" and all(n.startswith(PREFIXES) for n in names)
    for prefix in PREFIXES:
        assert any(n.startswith(prefix) for n in names), prefix
    assert "kernels-attention" in names and "kernels-load" not in names
    kinds = [next(p for p in ("tune", "tests-gpu", "kernels-", "e2e-") if n.startswith(p)) for n in names]
    assert kinds == sorted(kinds, key=["tune", "tests-gpu", "kernels-", "e2e-"].index)


def test_budget_keeps_the_most_informative_steps_within_it():
    steps = gpu_run.plan_steps(dry=False)
    assert sum(s.planned_gpu_s for s in steps) > 480  # the rule has work to do
    planned = gpu_run.select(steps, 480)
    kept = {s.name for s in steps if s.selected}
    assert planned <= 480 and planned == sum(s.planned_gpu_s for s in steps if s.selected)
    assert {"tune", "e2e-flux-dev-diffusers", "e2e-flux-dev-fastflow", "kernels-attention", "tests-gpu-fp8"} <= kept
    assert "e2e-sdxl-compile" not in kept  # last in the priority order
    gpu_run.select(steps, 50)
    assert [s.name for s in steps if s.selected] == ["tune"]


def test_unknown_bench_ranks_with_the_other_kernels():
    new = gpu_run.Step("kernels-some_new_op", [], 20)
    assert new.priority == gpu_run.PRIORITY.index("kernels-*")


def test_dry_run_subset_is_green(tmp_path):
    out = tmp_path / "run.jsonl"
    only = ["tune", "kernels-gelu_tanh", "kernels-gelu_tanh_fp8_quantize", "e2e-sdxl-vae"]
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_run.py"), "--dry-run", "--out", str(out), "--only", *only],
                          capture_output=True, text=True, timeout=110)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == only and all(r["returncode"] == 0 for r in rows)
    assert sum(r["planned_gpu_s"] for r in rows) <= 480
    e2e = rows[3]["results"]
    assert {r["variant"] for r in e2e} == {"diffusers", "fastflow"}
    assert all(r["cosine"] > 0.999 and r["rel_err"] < 1e-3 for r in e2e)
    assert rows[1]["results"][0]["max_abs_err"] < 1e-4
    # the FP8 codes through the kernel tests' faithful interpreter (the bare one halves 127.3 to 64)
    assert rows[2]["results"][0]["case"] == "tiny" and rows[2]["results"][0]["max_abs_err"] < 1e-6
    assert "| e2e-sdxl-vae | 0 |" in out.with_suffix(".md").read_text()


def test_e2e_timer_without_timed_reps():
    """A step without the diffusers variant still runs diffusers once for the reference, untimed."""
    import e2e

    first, ms, out = e2e.timed(lambda: 7, 0, "cpu")
    assert ms is None and out == 7 and first >= 0
