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


def test_the_one_line_for_the_embedded_model_runs(tmp_path, monkeypatch):
    """The README's one Python line (the embedded model) runs as written and saves an image."""
    import torch
    from PIL import Image

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    code = blocks[0].strip()
    assert code.startswith('import fastflow\n\nfastflow.load("fastflow-tiny-digits")') and code.count("\n") == 2
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core CI machine: small models contend with 2 threads
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    with Image.open(tmp_path / "seven.png") as image:
        assert image.size == (16, 16)
