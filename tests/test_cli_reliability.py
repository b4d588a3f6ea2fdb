"""The CLI never ends in a traceback on bad input, reports bugs in one line, and never loses or
truncates an image (issue 11). Runs on the embedded model."""

import os
import subprocess
import sys

import pytest
from PIL import Image

from fastflow import cli
from fastflow.cli import generate, output


def run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "fastflow", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-n", "0"], "from 1 to"),
        (["-n", str(10**7)], "from 1 to"),  # tried 40 GB before
        (["--device", "bogus"], "not a device"),
        (["--device", "cuda:7"], "cuda"),
        (["--upscale", "100000"], "--upscale"),
        (["--upscale", "0"], "--upscale"),
        (["--seed", str(2**64)], "2\\*\\*64"),
        (["--steps", str(10**7)], "10000"),
        (["-H", "4096", "-W", "4096"], "limit"),
        (["-o", "/proc/x.png"], "cannot"),
    ],
)
def test_bad_arguments_exit_2_in_one_line(tmp_path, extra, message):
    args = ["generate", "a seven", "--no-progress", *extra]
    if "-o" not in extra:
        args += ["-o", tmp_path / "x.png"]
    result = run(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not list(tmp_path.glob("*.png"))


def test_argparse_type_errors_exit_2():
    result = run("generate", "a seven", "-n", "1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_unwritable_output_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "file").write_text("")
    result = run("generate", "a seven", "--no-progress", "-o", folder / "file" / "x.png")
    assert result.returncode == 2 and "cannot" in result.stderr and "Traceback" not in result.stderr


def test_a_bug_is_one_line_asking_for_a_report(monkeypatch, capsys, tmp_path):
    import fastflow.loading

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(fastflow.loading, "inspect_checkpoint", broken)
    assert cli.main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "please report" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(generate, "run", broken)
    assert cli.main(["generate", "x", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_output_names_are_claimed_atomically(tmp_path):
    target = tmp_path / "a.png"
    claimed = [output.claim_path(target) for _ in range(3)]
    assert [p.name for p in claimed] == ["a.png", "a-1.png", "a-2.png"]


def test_an_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    image = Image.new("RGB", (16, 16))

    def interrupted_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        output.save_png(image, tmp_path / "x.png", "p", 0, {})
    assert list(tmp_path.iterdir()) == []


def test_two_processes_writing_the_same_name_lose_nothing(tmp_path):
    """Check-then-write let two runs claim the same numbered names (16 of 80 lost in one trial)."""
    args = ["generate", "a seven", "-n", "40", "--steps", "1", "--no-progress", "-o", tmp_path / "same.png"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fastflow", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 80 and all(f.suffix == ".png" for f in files)
    for f in files:
        with Image.open(f) as im:
            im.load()  # a truncated PNG fails here
        assert f.stat().st_size > 100
