"""The README's two set-up commands are what CI runs: keep them in sync."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    main_job, tests = commands[0], commands[1]
    assert main_job.endswith('fastflow generate "a handwritten seven" -o seven.png')
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split(" && "):
        assert step in ci, f"README test step {step!r} is not in .ci/run"
