"""The shipped fastflow-tiny-digits model: the README's main job, recognisable digits, the yardstick."""

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastflow
from fastflow import evaluation
from fastflow.loading import DEFAULT_MODEL

ROOT = Path(__file__).parent.parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipe():
    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_in_the_layout_load_reads(pipe):
    assert pipe.transformer.config.name == "fastflow-tiny-digits"
    assert pipe.defaults["steps"] == 16 and pipe.defaults["true_cfg"] == 1.5
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file())
    assert size < 6e6  # a few MB


def test_free_text_prompts_draw_the_right_digit(pipe):
    """Three phrasings per digit, default settings, fixed seeds; a classifier trained on the real
    digits (98.9% held-out accuracy) reads them."""
    stick = evaluation.Yardstick()
    prompts = [(f"a handwritten {w}", d) for d, w in enumerate(WORDS)] + [(f"the digit {d}", d) for d in range(10)]
    prompts += [(f"number {w}", d) for d, w in enumerate(WORDS)]
    images = np.concatenate([pipe(p, seed=7 + i, output_type="np").images for i, (p, _) in enumerate(prompts)])
    predicted = stick.classifier.predict(evaluation.to_digit_space(images))
    labels = np.array([d for _, d in prompts])
    assert (predicted == labels).mean() >= 0.9, list(zip(labels, predicted, strict=True))


def test_readme_main_job(tmp_path):
    """The README's main command as a user runs it: its installs ask for no more than generating
    needs (CI has installed a superset), and its generate step, run by the installed `fastflow`
    command from a fresh folder, writes the image."""
    import re
    import shlex
    import shutil
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    main_job = re.findall(r"```bash\n(.*?)```", readme, re.S)[0].strip()
    steps = main_job.split(" && ")
    installs, generate = steps[:-1], shlex.split(steps[-1])
    assert all(step.startswith("python -m pip install ") for step in installs)
    assert '-e ".[pipeline]"' in main_job and "test" not in main_job  # nothing generating does not need
    assert generate[:2] == ["fastflow", "generate"]
    command = [shutil.which("fastflow") or "fastflow", *generate[1:], "--seed", "3", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with Image.open(tmp_path / "seven.png") as image:
        assert image.size == (256, 256) and image.text["prompt"] == "a handwritten seven"


def test_quality_bench_runs_and_reports(tmp_path):
    quality = _quality_module()
    out = tmp_path / "q.json"
    assert quality.main(["--per-digit", "3", "--steps", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["images"] == 30 and 0 <= row["prompt_accuracy"] <= 1 and row["fd_digits"] > row["fd_floor"] > 0


def test_unupsample_inverts_the_training_resize():
    real, _ = evaluation.real_digits()
    grey = torch.tensor(real[:20].reshape(20, 1, 8, 8))
    up = torch.nn.functional.interpolate(grey, size=(16, 16), mode="bilinear", align_corners=False)
    rgb = (up[:, 0, :, :, None].expand(-1, -1, -1, 3).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_allclose(evaluation.to_digit_space(rgb), real[:20], atol=0.03)


def test_fp8_embedded_model_draws_the_same_digits(pipe):
    """quant="fp8" at load (default skip list): the FP8 layers are in place and the images stay the
    digits they were (bench/quality.py --quant fp8 measures FD-digits on 500 images)."""
    from fastflow.quant import fp8_layers

    fp8 = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32, quant="fp8")
    fp8.set_progress_bar_config(disable=True)
    assert len(fp8_layers(fp8.transformer)) >= 10
    prompts = [f"a handwritten {w}" for w in WORDS]
    a = np.concatenate([pipe(p, seed=3, output_type="np").images for p in prompts])
    b = np.concatenate([fp8(p, seed=3, output_type="np").images for p in prompts])
    assert a.dtype == np.float32 and 0 < np.abs(a - b).mean() < 0.02  # quantized, and close
    predicted = evaluation.Yardstick().classifier.predict(evaluation.to_digit_space(b))
    assert (predicted == np.arange(10)).mean() >= 0.9


def test_int8_embedded_model_draws_the_same_digits(pipe):
    """quant="int8" at load (default skip list): int8 layers in place, the same digits (bench/quality.py
    --quant none int8 measures FD-digits on 500 images)."""
    from fastflow.quant import int8_layers

    int8 = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32, quant="int8")
    int8.set_progress_bar_config(disable=True)
    assert len(int8_layers(int8.transformer)) >= 10
    assert type(int8.transformer.img_in) is torch.nn.Linear  # embedders and the final layer kept
    assert type(int8.transformer.final_layer.linear) is torch.nn.Linear
    prompts = [f"a handwritten {w}" for w in WORDS]
    a = np.concatenate([pipe(p, seed=3, output_type="np").images for p in prompts])
    b = np.concatenate([int8(p, seed=3, output_type="np").images for p in prompts])
    assert 0 < np.abs(a - b).mean() < 0.02  # quantized, and close
    predicted = evaluation.Yardstick().classifier.predict(evaluation.to_digit_space(b))
    assert (predicted == np.arange(10)).mean() >= 0.9


def test_quality_bench_reports_fp8(tmp_path):
    quality = _quality_module()
    out = tmp_path / "q.json"
    assert quality.main(["--per-digit", "2", "--steps", "2", "--quant", "fp8", "--json", str(out)]) == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["quant"].startswith("fp8-e4m3") and row["images"] == 20
