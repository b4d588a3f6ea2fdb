"""The shipped fastflow-tiny-digits-unet model: SDXL's UNet on the digits, the UNet yardstick."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastflow
from fastflow import evaluation
from fastflow.loading import DEFAULT_MODEL, inspect_checkpoint
from fastflow.loading.source import resolve_model

NAME = "fastflow-tiny-digits-unet"
ASSET = DEFAULT_MODEL.parent / NAME
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def pipe():
    pipe = fastflow.load(NAME, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_by_name_as_sdxl(pipe):
    assert resolve_model(NAME) == ASSET
    assert type(pipe).__name__ == "SDXLPipeline"
    assert pipe.unet.config.name == NAME and pipe.vae.config.name == "fastflow-tiny-digits-vae"
    assert pipe.config.sampling.size == (16, 16) and pipe.defaults["sampler"] == "euler"
    assert pipe.force_zeros_for_empty_prompt is False  # model_index.json: trained with the empty prompt
    assert sum(p.numel() for p in pipe.unet.parameters()) < 5e6  # a few million at most
    size = sum(p.stat().st_size for p in ASSET.rglob("*") if p.is_file())
    assert size < 6e6  # a few MB


def test_asset_passes_the_loaders_validation():
    """Headers, key layout and config.json agree with the registered config; the VAE is the FLUX
    digits model's, byte for byte, with the latent scale / shift the UNet was trained on."""
    info = inspect_checkpoint(ASSET)
    assert info.family == "sdxl" and info.variant == NAME
    index = json.loads((ASSET / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["_fastflow_cpu_dtype"] == "float32"
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (ASSET / name).read_bytes() == (DEFAULT_MODEL / name).read_bytes()
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (ASSET / part).is_dir(), part


def test_generates_the_right_shape_and_a_seed_is_reproducible(pipe):
    out = pipe("a handwritten seven", seed=5, num_images_per_prompt=2, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and out.settings["model"] == NAME
    again = pipe("a handwritten seven", seed=5, num_images_per_prompt=2, output_type="np")
    other = pipe("a handwritten seven", seed=6, output_type="np")
    assert np.array_equal(out.images, again.images)
    assert not np.array_equal(out.images[:1], other.images)


def test_draws_the_asked_digit(pipe):
    """Three phrasings per digit at the default settings, fixed seeds; the yardstick's classifier
    (trained on the real digits) reads them."""
    prompts = [(f"a handwritten {w}", d) for d, w in enumerate(WORDS)] + [(f"the digit {d}", d) for d in range(10)]
    prompts += [(f"number {w}", d) for d, w in enumerate(WORDS)]
    images = np.concatenate([pipe(p, seed=7 + i, output_type="np").images for i, (p, _) in enumerate(prompts)])
    predicted = evaluation.Yardstick().classifier.predict(evaluation.to_digit_space(images))
    labels = np.array([d for _, d in prompts])
    assert (predicted == labels).mean() >= 0.85, list(zip(labels, predicted, strict=True))


def test_cli_model_option(tmp_path):
    command = [sys.executable, "-m", "fastflow", "generate", "a handwritten three", "--model", NAME, "-o",
               tmp_path / "three.png", "--seed", "2", "--no-progress"]  # fmt: skip
    done = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "three.png") as image:
        assert image.size == (256, 256)  # 16 px, the config's view upscale 16
        settings = json.loads(image.text["settings"])
    assert settings["model"] == NAME and settings["height"] == 16


def test_quality_bench_reports_both_models(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parent.parent / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    out = tmp_path / "q.json"
    argv = ["--model", "fastflow-tiny-digits", NAME, "--per-digit", "3", "--steps", "2", "--json", str(out)]
    assert quality.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["model_name"] for r in rows] == ["fastflow-tiny-digits", NAME]
    assert all(r["images"] == 30 and r["fd_digits"] > r["fd_floor"] > 0 for r in rows)
