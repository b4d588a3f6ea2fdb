"""The CLI through a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from .conftest import tiny_pipeline_folder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("cli") / "flux", "flux-tiny-dev")


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastflow", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_generate_writes_png_with_metadata_and_never_overwrites(model, tmp_path):
    out = tmp_path / "seven.png"
    args = [
        "generate",
        "a handwritten seven",
        "-o",
        out,
        "--model",
        model,
        "-H",
        24,
        "-W",
        40,
        "--steps",
        2,
        "--seed",
        7,
        "--no-progress",
    ]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    second = run(*args[:1], "-p", "the digit 3", *args[2:], "-n", 2, "--upscale", 2)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seven-1.png", "seven-2.png", "seven.png"]
    with Image.open(out) as image:
        assert image.size == (40, 24)
        meta = dict(image.text)
    assert meta["prompt"] == "a handwritten seven" and meta["seed"] == "7"
    settings = json.loads(meta["settings"])
    assert settings["num_inference_steps"] == 2 and settings["model"] == "flux-tiny-dev"
    with Image.open(tmp_path / "seven-2.png") as image:
        assert image.size == (80, 48) and image.text["seed"] == "8" and image.text["prompt"] == "the digit 3"
    # the same seed gives the same pixels: seven.png and a fresh run agree
    third = run(*args[:3], tmp_path / "again.png", *args[4:])
    assert third.returncode == 0
    with Image.open(out) as a, Image.open(tmp_path / "again.png") as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--model", "/nonexistent/model"], "no such file"),
        (["--image", "/nonexistent.png"], "--image /nonexistent.png: no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, extra, message):
    args = ["generate", "a cat", "-o", tmp_path / "x.png", "--model", model, "-H", 24, "-W", 40, "--no-progress"]
    done = run(*args, *extra)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith("fastflow: error:") and message in err[-1]
    assert not (tmp_path / "x.png").exists()


def test_pickle_model_exit_2(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    done = run("generate", "a cat", "--model", tmp_path / "model.ckpt")
    assert done.returncode == 2 and "pickle" in done.stderr


def test_usage_errors_exit_2():
    assert run("generate", "--dtype", "int8").returncode == 2  # argparse
    assert run("frobnicate").returncode == 2


def test_info_and_doctor(model):
    info = run("info", model)
    assert info.returncode == 0 and "flux-tiny-dev or flux-tiny-kontext" not in info.stdout
    assert "flux-tiny-dev" in info.stdout and "FLUX.1" in info.stdout
    doctor = run("doctor")
    assert doctor.returncode == 0 and "layernorm_modulate" in doctor.stdout


def test_generate_sdxl_turbo_folder(tmp_path):
    """An SDXL-Turbo pipeline folder through the CLI: detected from its files, sampled with its own
    defaults (Euler ancestral, trailing spacing, no CFG), the settings in the PNG."""
    folder = tiny_pipeline_folder(tmp_path / "turbo", "sdxl-tiny-turbo")
    out = tmp_path / "seven.png"
    done = run("generate", "a handwritten seven", "-o", out, "--model", folder, "-H", 32, "-W", 48, "--seed", 3,
               "--steps", 2, "--no-progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size == (48, 32)
        settings = json.loads(image.text["settings"])
    assert settings["model"] == "sdxl-tiny-turbo" and settings["sampler"] == "euler_ancestral"
    assert settings["timestep_spacing"] == "trailing" and settings["guidance_scale"] == 0.0
    refused = run("generate", "a seven", "-o", tmp_path / "x.png", "--model", folder, "--true-cfg", 2, "--no-progress")
    assert refused.returncode == 2 and "SDXL run CFG with --guidance" in refused.stderr
