"""Models no registered config fits: a diffusers folder is described by its config.json, a single
file by config= (or CLI --config); the config is still checked against the tensors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastflow
from fastflow.errors import InputError, UnknownConfigError, VariantMismatchError
from fastflow.models.flux import pack_latents, unpack_latents

from ..conftest import tiny_diffusers_flux, tiny_pipeline_folder
from .test_parity import H, W, _rel, diffusers_flux

DEPTH, SINGLE = 1, 2  # flux-tiny-dev is 2 + 2: this size is registered nowhere


def _folder(root, **changes):
    """flux-tiny-dev's pipeline folder with a transformer of another size."""
    root = tiny_pipeline_folder(root, "flux-tiny-dev")
    shutil.rmtree(root / "transformer")
    tiny_diffusers_flux("flux-tiny-dev", seed=5, **changes).save_pretrained(root / "transformer")
    return root


@pytest.fixture(scope="module")
def custom_folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("described") / "lite-flux", depth=DEPTH, depth_single_blocks=SINGLE)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """Another width (3 heads of 32: 96 wide) at the registered depth."""
    return _folder(tmp_path_factory.mktemp("described") / "wide-flux", hidden_size=96, num_heads=3)


@pytest.mark.parametrize("which", ["custom_folder", "wide_folder"])
def test_a_diffusers_folder_of_an_unregistered_size_loads_and_matches_diffusers(request, which):
    folder = request.getfixturevalue(which)
    pipe = fastflow.load(folder, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    cfg = pipe.transformer.config
    expected = (DEPTH, SINGLE, 64) if which == "custom_folder" else (2, 2, 96)
    assert (cfg.depth, cfg.depth_single_blocks, cfg.hidden_size) == expected and cfg.guidance_embed
    assert cfg.name == f"custom:{folder.name}" and cfg.sampling.guidance == 3.5  # dev-like: guidance-distilled
    txt, y = pipe.text_encoder(["a handwritten seven"])
    noise = torch.randn(1, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, height=H, width=W, num_inference_steps=3, guidance_scale=3.5)
    ours = pipe(latents=noise, output_type="latent", **kw).images
    ref = diffusers_flux(folder, dynamic=True)
    theirs = unpack_latents(ref(latents=pack_latents(noise), output_type="latent", **kw).images, H // 2, W // 2)
    assert _rel(ours, theirs) <= 1e-5


def test_a_config_json_that_contradicts_the_tensors_is_refused(custom_folder, tmp_path):
    folder = tmp_path / "transformer"
    shutil.copytree(custom_folder / "transformer", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_single_layers": SINGLE + 1}))
    with pytest.raises(VariantMismatchError, match="config.json describes"):
        fastflow.load_transformer(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def custom_file(custom_folder, tmp_path_factory):
    """The transformer as one safetensors file in diffusers' key layout, without its config.json."""
    path = tmp_path_factory.mktemp("single") / "lite-flux.safetensors"
    save_file(load_file(custom_folder / "transformer" / "diffusion_pytorch_model.safetensors"), path)
    return path


def test_a_single_file_of_an_unregistered_size_needs_config_and_takes_it(custom_file):
    with pytest.raises(UnknownConfigError, match="config="):
        fastflow.load_transformer(custom_file, dtype=torch.float32)
    fields = dict(hidden_size=64, num_heads=2, vec_in_dim=32, context_in_dim=48, axes_dim=[8, 12, 12])
    model = fastflow.load_transformer(
        custom_file, dtype=torch.float32, config={**fields, "depth": DEPTH, "depth_single_blocks": SINGLE}
    )
    assert (model.config.depth, model.config.depth_single_blocks) == (DEPTH, SINGLE)
    with pytest.raises(VariantMismatchError):  # fields that do not describe the tensors
        fastflow.load_transformer(custom_file, config={**fields, "depth": DEPTH + 1, "depth_single_blocks": SINGLE})
    with pytest.raises(InputError, match="unknown FluxConfig field"):
        fastflow.load_transformer(custom_file, config={"layers": 3})


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fastflow", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_generates_with_an_unregistered_folder_and_a_described_file(custom_folder, custom_file, tmp_path):
    run = _cli("generate", "a seven", "--model", str(custom_folder), "--steps", "2", "-H", "32", "-W", "32",
               "--no-progress", "-o", "a.png", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "a.png").is_file()
    fields = {"hidden_size": 64, "num_heads": 2, "vec_in_dim": 32, "context_in_dim": 48, "axes_dim": [8, 12, 12],
              "depth": DEPTH, "depth_single_blocks": SINGLE}  # fmt: skip
    (tmp_path / "lite.json").write_text(json.dumps(fields))
    bad = _cli("generate", "a seven", "--model", str(custom_file), "--config", "{not json", "-o", "b.png",
               cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "--config must be a JSON object" in bad.stderr


def test_models_load_by_name(tmp_path):
    pipe = fastflow.load("fastflow-tiny-digits", device="cpu")
    assert pipe.transformer.config.name == "fastflow-tiny-digits"
    with pytest.raises(InputError, match="registered model config, not files"):
        fastflow.load("flux-dev")
    run = _cli("generate", "a seven", "--model", "fastflow-tiny-digits", "--no-progress", "-o", "c.png", cwd=tmp_path)
    assert run.returncode == 0 and (tmp_path / "c.png").is_file(), run.stderr
