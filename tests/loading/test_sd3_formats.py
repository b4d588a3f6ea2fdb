"""SD3 / SD3.5 checkpoints: official single files (model.diffusion_model. prefix, VAE beside it)
and diffusers folders load identically; variants are told from keys where keys can tell."""

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow import errors

from ..conftest import tiny_diffusers_sd3


@pytest.fixture(scope="module")
def sd35_medium(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd35_medium")
    tiny_diffusers_sd3("sd3.5-tiny-medium", seed=11).save_pretrained(folder, max_shard_size="300KB")
    return folder


def _official_file(path, state, metadata=None):
    tensors = {f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 16, 3, 3)  # the VAE rides along
    save_file(tensors, str(path), metadata=metadata)
    return path


def _run(model):
    g = torch.Generator().manual_seed(0)
    c = model.config
    x, ctx, y = (
        torch.randn(1, 16, 8, 6, generator=g),
        torch.randn(1, 5, c.context_in_dim, generator=g),
        torch.randn(1, c.adm_in_dim, generator=g),
    )
    with torch.no_grad():
        return model(x, torch.tensor([500.0]), ctx, y)


def test_official_single_file_and_diffusers_folder_load_identically(tmp_path, sd35_medium):
    from_diffusers = fastflow.load_transformer(sd35_medium, dtype=torch.float32)
    assert from_diffusers.config.name == "sd3.5-tiny-medium"  # dual attention in layer 0, from keys
    state = from_diffusers.state_dict()
    official = fastflow.load_transformer(_official_file(tmp_path / "sd35m.safetensors", state), dtype=torch.float32)
    assert official.config.name == "sd3.5-tiny-medium"
    for k, v in official.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(_run(official), _run(from_diffusers), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["sd3-tiny-medium", "sd3.5-tiny-medium"])
def test_variant_from_keys(tmp_path, variant):
    from fastflow.models import MMDiT, from_name

    path = _official_file(tmp_path / "m.safetensors", MMDiT(from_name(variant)).state_dict())
    assert fastflow.load_transformer(path).config.name == variant
    assert fastflow.inspect_checkpoint(path).other_components == ("first_stage_model",)


def test_large_and_turbo_need_variant_or_metadata(tmp_path):
    from fastflow.models import MMDiT, from_name

    state = MMDiT(from_name("sd3.5-tiny-large")).state_dict()
    bare = _official_file(tmp_path / "bare.safetensors", state)
    with pytest.raises(errors.AmbiguousVariantError, match="turbo") as e:
        fastflow.load_transformer(bare)
    assert "variant=" in str(e.value)
    assert fastflow.load_transformer(bare, variant="sd3.5-tiny-large-turbo").config.turbo
    named = _official_file(
        tmp_path / "named.safetensors", state, {"modelspec.title": "Stable Diffusion 3.5 Large Turbo"}
    )
    assert fastflow.load_transformer(named).config.name == "sd3.5-tiny-large-turbo"
    plain = _official_file(tmp_path / "plain.safetensors", state, {"modelspec.title": "Stable Diffusion 3.5 Large"})
    assert fastflow.load_transformer(plain).config.name == "sd3.5-tiny-large"


def test_flux_file_passed_as_sd3(tmp_path):
    from fastflow.models import Flux, from_name

    path = tmp_path / "flux.safetensors"
    save_file(Flux(from_name("flux-tiny-schnell")).state_dict(), str(path))
    with pytest.raises(errors.FamilyMismatchError, match="FLUX") as e:
        fastflow.load_transformer(path, family="sd3")
    assert str(path) in str(e.value)
    with pytest.raises(errors.FamilyMismatchError):  # an SD3 variant name implies the family
        fastflow.load_transformer(path, variant="sd3-tiny-medium")


def test_sd3_shape_mismatch_names_the_tensor(tmp_path):
    from fastflow.models import MMDiT, from_name

    state = MMDiT(from_name("sd3-tiny-medium")).state_dict()
    state["joint_blocks.1.x_block.mlp.fc2.weight"] = torch.zeros(128, 256)
    path = _official_file(tmp_path / "bad.safetensors", state)
    with pytest.raises(errors.ShapeMismatchError, match="joint_blocks.1.x_block.mlp.fc2.weight"):
        fastflow.load_transformer(path)
