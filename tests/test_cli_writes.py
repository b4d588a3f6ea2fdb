"""Issue 31, writes: outputs under the user's umask, quantize claims OUT before any work, SIGTERM /
SIGHUP during a save leave no partial or empty file."""

import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from fastflow.cli import output
from fastflow.errors import OutputError
from fastflow.loading import writer


def test_images_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = output.save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", "p", 0, {})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # before: 0o600 (mkstemp)


def test_quantize_claims_out_before_loading(tmp_path, monkeypatch):
    dst = tmp_path / "q.safetensors"
    seen = {}

    def fake_load(*args, **kwargs):
        seen["claimed"] = dst.exists()
        raise OutputError("stop here")

    monkeypatch.setattr(writer, "load_transformer", fake_load)
    monkeypatch.setattr(writer, "_weights_in", lambda src: 1)
    with pytest.raises(OutputError):
        writer.quantize_checkpoint("model", dst)
    assert seen == {"claimed": True} and not dst.exists()  # claimed during the work, released on failure


def test_quantize_into_an_unwritable_folder_fails_before_loading(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    monkeypatch.setattr(writer, "load_transformer", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(OutputError, match="cannot write"):
        writer.quantize_checkpoint("model", folder / "q.safetensors")


def test_quantize_onto_a_full_disk_fails_before_loading(tmp_path, monkeypatch):
    dst = tmp_path / "q.safetensors"
    monkeypatch.setattr(writer, "_weights_in", lambda src: 12 * 10**9)  # FLUX-dev: 12 G weights
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: _Usage(5 * 2**30))
    monkeypatch.setattr(writer, "load_transformer", lambda *a, **k: pytest.fail("loaded before checking"))
    with pytest.raises(OutputError, match=r"5\.00 GiB free; the FP8 file needs at least 11\.18 GiB"):
        writer.quantize_checkpoint("model", dst)
    assert not dst.exists()


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = free, 0, free


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_save_leaves_nothing(tmp_path, sig):
    code = (
        "import sys; from PIL import Image; from fastflow.cli import main\n"
        "from fastflow.cli import generate\n"
        "def run(args):\n"
        "    from fastflow.cli.output import save_png\n"
        "    print('saving', flush=True)\n"
        "    save_png(Image.new('RGB', (8, 8)), __import__('pathlib').Path(args.output), 'p', 0, {})\n"
        "    return 0\n"
        "generate.run = run\n"
        "sys.exit(main(['generate', 'x', '-o', sys.argv[1]]))\n"
    )
    env = dict(os.environ, FASTFLOW_TEST_SLOW_SAVE="20")
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "a.png")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdout.readline() == b"saving\n"
    deadline = time.time() + 10
    while not any(tmp_path.glob(".a.png.*")) and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(sig)
    assert p.wait(timeout=10) == 128 + sig, p.stderr.read()
    assert list(tmp_path.iterdir()) == []  # before: an empty a.png and a hidden temporary
