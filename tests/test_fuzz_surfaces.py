"""The surface fuzzer (tools/fuzz.py: LoRA, FP8, SDXL folders and files, tokenizers and prompts, CLI
and image metadata, caches, pipeline arguments) on the CI budget, and proof that it can fail.

The CI round fails on any failure class (untyped, mismatch, timeout, memory, nonfinite, ignored,
refused_valid, unsafe_print, write_outside)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
TOOL = TOOLS / "fuzz.py"


@pytest.fixture(scope="module")
def tools_path():
    sys.path.insert(0, str(TOOLS))
    yield
    sys.path.remove(str(TOOLS))


def test_ci_round_over_every_surface_has_no_failures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    report = tmp_path / "fuzz.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--cases", "200", "--seed", "7", "--timeout", "15", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr[-3000:]
    assert "untyped 0, mismatch 0, timeout 0, memory 0, nonfinite 0, ignored 0, refused_valid 0" in out
    assert "unsafe_print 0, write_outside 0" in out
    for surface in ("lora", "fp8", "sdxl", "text", "cli", "cache", "args"):  # every surface ran
        assert f"  {surface} " in out, out


def test_the_fuzzer_reports_each_failure_class(tools_path, tmp_path, monkeypatch):
    """Planted bugs: an untyped error, a hang, a non-finite image, an escape sequence printed raw
    and a file written outside the asked path are each reported as such."""
    import fuzz_common

    def target_untyped(case):
        raise KeyError("boom")

    assert fuzz_common.judge_exception(KeyError("x"))["outcome"] == "untyped"
    from fastflow.errors import InputError

    assert fuzz_common.judge_exception(InputError("x"))["outcome"] == "typed"
    runner = fuzz_common.Runner("fuzz_planted:hang", (), timeout=3, memory_bytes=2**31)
    (tmp_path / "fuzz_planted.py").write_text(
        "import time\n"
        "def hang(case):\n    time.sleep(60)\n"
        "def crash(case):\n    import os; os._exit(3)\n"
        "def untyped(case):\n    raise KeyError(case)\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert runner.run(0)["outcome"] == "timeout"
        runner.args, runner.timeout = ("fuzz_planted:crash", (), 2**31), 60
        r = runner.run(1)
        assert r["outcome"] == "untyped", r
        runner.args = ("fuzz_planted:untyped", (), 2**31)
        assert runner.run(2)["outcome"] == "untyped"
    finally:
        runner.close()


def test_the_surfaces_report_planted_bugs(tools_path, tmp_path, monkeypatch):
    """A NaN image, an unmutated field that is ignored, a raw escape sequence and a write outside
    the asked path reach their classes through the surfaces' own judges."""
    import torch

    fuzz_args = importlib.import_module("fuzz_args")
    fuzz_cli = importlib.import_module("fuzz_cli")

    class NanPipe:
        def __call__(self, **kw):
            return type("Out", (), {"images": torch.full((1, 3, 4, 4), float("nan"))})()

        def set_progress_bar_config(self, **kw):
            pass

    monkeypatch.setattr(fuzz_args, "VARIANTS", ("planted",))
    monkeypatch.setattr(fuzz_args, "SIZE", {"planted": (16, 16)})
    monkeypatch.setitem(fuzz_args._PIPES, "planted", NanPipe())
    outcomes = {fuzz_args.run_case(("args", i), 0, tmp_path, tmp_path / f"a{i}")["outcome"] for i in range(8)}
    assert "nonfinite" in outcomes or "refused_valid" in outcomes or "mismatch" in outcomes

    import fastflow.cli

    def evil_main(argv):
        print(fuzz_cli.MARK)
        return 0

    def outside_main(argv):
        Path("stray.txt").write_text("x")
        return 0

    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for main, expected in ((evil_main, "unsafe_print"), (outside_main, "write_outside")):
        monkeypatch.setattr(fastflow.cli, "main", main)
        monkeypatch.setattr(fuzz_cli, "_mutated_png", lambda rng, seed, out: out.write_bytes(b"") or "planted")
        for i in range(20):  # the first case whose mutation is a PNG (not -p / a valid file)
            r = fuzz_cli.run_case(("cli", i), 0, seeds, tmp_path / f"{main.__name__}{i}")
            if r["desc"] == "--from PNG: planted":
                assert r["outcome"] == expected, r
                break
        else:
            pytest.fail("no PNG case in 20")
