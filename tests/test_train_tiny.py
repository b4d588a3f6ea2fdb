"""The training tool is reproducible and writes a folder fastflow.load() reads (tiny budget here;
the shipped model's training is tools/train_tiny.py at its defaults)."""

import re
import subprocess
import sys
from pathlib import Path

import torch

import fastflow

ROOT = Path(__file__).parent.parent


def _train(out, *extra):
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train_tiny.py"),
            "--out",
            str(out),
            "--vae-steps",
            "3",
            "--steps",
            "3",
            "--batch",
            "8",
            "--vae-batch",
            "4",
            "--log-every",
            "0",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return re.search(r"weights sha256 ([0-9a-f]{64})", done.stdout)[1]


def test_same_seed_same_weights_and_loadable(tmp_path):
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first == second
    for name in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    pipe = fastflow.load(tmp_path / "a", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a handwritten seven", seed=0, num_inference_steps=2)
    assert out.images[0].size == (16, 16) and out.settings["model"] == "fastflow-tiny-digits"


def test_unet_family_trains_end_to_end_and_loads(tmp_path):
    """--family unet: a few steps of the UNet model's training (the FLUX model's VAE reused), the
    same weights from the same seed, and a folder fastflow.load() reads as SDXL."""
    first = _train(tmp_path / "a", "--family", "unet", "--threads", "1")
    second = _train(tmp_path / "b", "--family", "unet", "--threads", "1")
    assert first == second
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    pipe = fastflow.load(tmp_path / "a", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a handwritten seven", seed=0, num_inference_steps=2)
    assert type(pipe).__name__ == "SDXLPipeline"
    assert out.images[0].size == (16, 16) and out.settings["model"] == "fastflow-tiny-digits-unet"
