import subprocess
import sys

from safetensors.torch import save_file

from fastflow.cli import main
from fastflow.models import Flux, from_name


def test_info_describes_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "schnell.safetensors"
    save_file(Flux(from_name("flux-tiny-schnell")).state_dict(), str(path))
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FLUX.1" in out and "flux-tiny-schnell" in out and "F32 x" in out


def test_info_on_an_ambiguous_file_names_both_variants(tmp_path, capsys):
    path = tmp_path / "dev.safetensors"
    save_file(Flux(from_name("flux-tiny-dev")).state_dict(), str(path))
    assert main(["info", str(path)]) == 0
    assert "flux-tiny-dev or flux-tiny-kontext" in capsys.readouterr().out


def test_smoke_runs_as_a_console_command():
    done = subprocess.run(
        [sys.executable, "-m", "fastflow", "smoke", "-H", "64", "-W", "96"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "smoke test passed" in done.stdout


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    assert "torch" in capsys.readouterr().out
