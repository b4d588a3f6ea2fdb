"""tools/kernel_report.py's CUDA C++ rows: every csrc/ kernel compiles without spills and the
vectorized ones really move 128 bits per instruction in their SASS (and a kernel that does not is
reported as a failure)."""

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "tools" / "kernel_report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here")


def test_csrc_kernels_compile_clean_for_sm90a():
    rows = report.cuda_rows([90])
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    names = {r["config"] for r in rows}
    assert {"cuda ff_groupnorm_apply_bf16", "cuda ff_groupnorm_stats_f16", "cuda ff_groupnorm_finalize"} <= names
    apply = next(r for r in rows if r["config"] == "cuda ff_groupnorm_apply_bf16")
    assert (apply["ld"], apply["st"], apply["target"]) == ("128", "128", "sm_90a")


def test_a_scalar_kernel_is_a_failure(monkeypatch):
    """finalize reads its partials with 32-bit loads: requiring 128-bit there must fail the row."""
    monkeypatch.setitem(report.VECTORIZED, "ff_groupnorm_finalize", ("LDG",))
    rows = report.cuda_rows([80], only=["finalize"])
    assert [r["ok"] for r in rows] == [False] and "not 128-bit" in rows[0]["error"]
