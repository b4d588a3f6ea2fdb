"""The loader fuzzer (tools/fuzz_loader.py) on the CI budget, and proof that it can fail."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "fuzz_loader.py"


@pytest.fixture(scope="module")
def fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_loader", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_budget_has_no_untyped_errors_hangs_or_blowups(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    report = tmp_path / "fuzz.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--cases", "300", "--seed", "11", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "untyped 0, mismatch 0, timeout 0, memory 0" in result.stdout
    assert " ok 0," not in result.stdout  # valid mutations (re-pads, data bytes) must load


def test_the_fuzzer_reports_untyped_errors_and_mismatches(fuzz_module, tmp_path, monkeypatch):
    seeds = tmp_path / "seeds"
    fuzz_module.build_seeds(seeds)
    (tmp_path / "work").mkdir()

    def untyped(seed, folder):
        raise KeyError("boom")

    monkeypatch.setattr(fuzz_module, "_load", untyped)
    assert fuzz_module.run_case(0, 0, seeds, tmp_path / "work")["outcome"] == "untyped"

    import torch

    calls = []

    def differs(seed, folder):
        calls.append(folder)
        return {"w": torch.full((2,), float(len(calls)))}

    monkeypatch.setattr(fuzz_module, "_load", differs)
    monkeypatch.setattr(fuzz_module, "make_case", lambda rng, root, case: (case.mkdir(), ("flux_file", "data", "x"))[1])
    assert fuzz_module.run_case(1, 0, seeds, tmp_path / "work")["outcome"] == "mismatch"
