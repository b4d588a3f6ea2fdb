"""Parity of our MMDiT with diffusers' SD3Transformer2DModel on tiny SD3, SD3.5-large (RMS qk-norm)
and SD3.5-medium (MMDiT-X dual attention) configs: batch 2, a non-square 12x8 latent, with and
without skip layers. Weights go through our diffusers-format mapping."""

import copy

import pytest
import torch

import fastflow
from fastflow.errors import InputError

from ..conftest import tiny_diffusers_sd3

VARIANTS = ["sd3-tiny-medium", "sd3.5-tiny-large", "sd3.5-tiny-medium"]
SKIPS = [(), (1,)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for variant in VARIANTS:
        ref = tiny_diffusers_sd3(variant, seed=7)
        folder = tmp_path_factory.mktemp(variant)
        ref.save_pretrained(folder)
        out[variant] = (ref, folder)
    return out


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, cfg.in_channels, 12, 8, generator=g),
        "t": torch.tensor([700.0, 250.0]),  # sigma * 1000, fp32
        "ctx": torch.randn(2, 9, cfg.context_in_dim, generator=g),
        "y": torch.randn(2, cfg.adm_in_dim, generator=g),
    }


def _ours(model, i, skip):
    with torch.no_grad():
        return model(i["x"], i["t"], i["ctx"], i["y"], skip_layers=skip).float()


def _theirs(model, i, skip, dtype):
    model = copy.deepcopy(model).to(dtype)  # never round the shared reference's weights
    with torch.no_grad():
        out = model(
            hidden_states=i["x"].to(dtype),
            encoder_hidden_states=i["ctx"].to(dtype),
            pooled_projections=i["y"].to(dtype),
            timestep=i["t"],
            skip_layers=list(skip) or None,
        ).sample.float()
    return out


def _load(folder, variant, dtype):
    return fastflow.load_transformer(folder, variant=variant, dtype=dtype)


@pytest.mark.parametrize("skip", SKIPS, ids=["all-layers", "skip-1"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp32_parity(models, variant, skip):
    ref, folder = models[variant]
    ours = _load(folder, variant, torch.float32)
    i = _inputs(ours.config)
    expected = _theirs(ref, i, skip, torch.float32)
    err = ((_ours(ours, i, skip) - expected).abs().max() / expected.abs().max()).item()
    assert err <= 1e-5, f"fp32 max relative error {err:.2e}"


@pytest.mark.parametrize("skip", SKIPS, ids=["all-layers", "skip-1"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_error_within_twice_diffusers(models, variant, skip):
    ref, folder = models[variant]
    i = _inputs(fastflow.models.from_name(variant))
    ref32, ref16 = _theirs(ref, i, skip, torch.float32), _theirs(ref, i, skip, torch.bfloat16)
    ours16 = _ours(_load(folder, variant, torch.bfloat16), i, skip)
    theirs, mine = (ref16 - ref32).abs().max().item(), (ours16 - ref32).abs().max().item()
    assert theirs > 0
    assert mine <= 2 * theirs + 1e-6, f"ours {mine:.3e} vs diffusers {theirs:.3e}"


def test_skipping_a_layer_changes_the_output(models):
    _, folder = models["sd3.5-tiny-medium"]
    model = _load(folder, "sd3.5-tiny-medium", torch.float32)
    i = _inputs(model.config)
    assert not torch.allclose(_ours(model, i, ()), _ours(model, i, (0,)))


def test_pos_embed_is_the_stored_one_centre_cropped(models):
    ref, folder = models["sd3-tiny-medium"]
    model = _load(folder, "sd3-tiny-medium", torch.float32)
    stored = ref.pos_embed.pos_embed.reshape(8, 8, -1)
    crop = model.cropped_pos_embed(6, 4).reshape(6, 4, -1)
    torch.testing.assert_close(crop, stored[1:7, 2:6], rtol=0, atol=0)


@pytest.mark.parametrize("h,w", [(18, 8), (8, 18)])
def test_patch_grid_beyond_the_crop_limit_is_a_clear_error(models, h, w):
    _, folder = models["sd3-tiny-medium"]
    model = _load(folder, "sd3-tiny-medium", torch.float32)
    i = _inputs(model.config)
    with pytest.raises(InputError, match="9x4|4x9") as e:
        model(torch.randn(1, 16, h, w), i["t"][:1], i["ctx"][:1], i["y"][:1])
    assert "8x8" in str(e.value) and "128 px" in str(e.value)


def test_odd_latent_size_is_a_clear_error(models):
    _, folder = models["sd3-tiny-medium"]
    model = _load(folder, "sd3-tiny-medium", torch.float32)
    i = _inputs(model.config)
    with pytest.raises(InputError, match="multiple of the patch size"):
        model(torch.randn(1, 16, 7, 8), i["t"][:1], i["ctx"][:1], i["y"][:1])
