"""`fastflow generate` imports only what it runs: no transformers, diffusers or torch.compile
machinery (torch._dynamo alone is 1.3 s, transformers about 3 s), checked in a fresh interpreter
where transformers and diffusers cannot be imported at all (a user who installed only
``fastflow[pipeline]``)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import sys

import pytest

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("transformers", "diffusers"):
            raise ImportError(f"{name} is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, Absent())
from fastflow.cli import main

code = main(["generate", "a handwritten seven", "-o", sys.argv[1], "--no-progress", "--seed", "3"])
heavy = [m for m in ("transformers", "diffusers", "torch._dynamo", "sympy", "torch._inductor") if m in sys.modules]
print("EXIT", code, "HEAVY", ",".join(heavy) or "-")
"""


def test_generate_runs_without_transformers_and_imports_nothing_heavy(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "seven.png")], capture_output=True, text=True, timeout=300
    )
    assert "EXIT 0 HEAVY -" in out.stdout, out.stdout + out.stderr
    assert (tmp_path / "seven.png").stat().st_size > 0


def test_pipeline_extra_does_not_pull_transformers():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["pipeline"]
    assert not [d for d in runtime if d.startswith(("transformers", "diffusers"))], runtime
    assert any(d.startswith("tokenizers") for d in project["optional-dependencies"]["pipeline"])
