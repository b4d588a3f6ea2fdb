"""The VAE against diffusers' AutoencoderKL (tiny config), the official key list, and tiling."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fastflow import errors
from fastflow.loading import load_vae
from fastflow.loading.keymaps import vae_from_diffusers
from fastflow.models import AutoEncoder, from_name

from ..conftest import tiny_diffusers_vae

LISTS = json.loads((Path(__file__).parent.parent / "data" / "vae_key_shapes.json").read_text())


@pytest.fixture(scope="module")
def diffusers_vae(tmp_path_factory):
    ref = tiny_diffusers_vae("vae-tiny-flux", seed=2)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder)
    return ref, folder


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_encode_mean_and_decode_match_diffusers(diffusers_vae):
    ref, folder = diffusers_vae
    ours = load_vae(folder, dtype=torch.float32)
    assert ours.config.name == "vae-tiny-flux"  # scale/shift read from config.json
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1  # non-square
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        z = ours.encode(x)
        assert _rel(z, 0.3611 * (mean - 0.1159)) <= 1e-5
        raw = torch.randn(2, 16, 6, 10, generator=g)
        img = ref.decode(raw).sample
        assert _rel(ours.decode(0.3611 * (raw - 0.1159)), img) <= 1e-5


def test_official_and_diffusers_layouts_load_identically(tmp_path, diffusers_vae):
    _, folder = diffusers_vae
    from_diffusers = load_vae(folder, dtype=torch.float32)
    state = from_diffusers.state_dict()
    save_file(state, str(tmp_path / "ae.safetensors"))
    official = load_vae(tmp_path / "ae.safetensors", variant="vae-tiny-flux", dtype=torch.float32)
    for k, v in official.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_sd3_single_file_vae_gets_the_sd3_scale(tmp_path, diffusers_vae):
    _, folder = diffusers_vae
    state = load_vae(folder, dtype=torch.float32).state_dict()
    tensors = {f"first_stage_model.{k}": v for k, v in state.items()}
    tensors["model.diffusion_model.pos_embed"] = torch.zeros(1, 4, 8)  # the transformer rides along
    save_file(tensors, str(tmp_path / "sd3.safetensors"))
    vae = load_vae(tmp_path / "sd3.safetensors", dtype=torch.float32)
    assert (vae.config.scale_factor, vae.config.shift_factor) == (1.5305, 0.0609)


def test_bare_official_vae_needs_variant(tmp_path, diffusers_vae):
    _, folder = diffusers_vae
    save_file(load_vae(folder, dtype=torch.float32).state_dict(), str(tmp_path / "ae.safetensors"))
    with pytest.raises(errors.AmbiguousVariantError, match="vae-tiny-sd3"):
        load_vae(tmp_path / "ae.safetensors")


def test_transformer_passed_as_vae(tmp_path):
    from fastflow.models import Flux

    save_file(Flux(from_name("flux-tiny-schnell")).state_dict(), str(tmp_path / "flux.safetensors"))
    with pytest.raises(errors.FamilyMismatchError, match="FLUX"):
        load_vae(tmp_path / "flux.safetensors")


def test_full_size_names_and_shapes():
    with torch.device("meta"):
        model = AutoEncoder(from_name("flux-vae"))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official, diffusers = LISTS["vae_official"], LISTS["vae_diffusers"]
    assert ours == official
    used = set()
    for key, shape in ours.items():
        segments = vae_from_diffusers(key, model.config)
        assert len(segments) == 1 and segments[0].key in diffusers, key
        assert list(segments[0].shape(tuple(diffusers[segments[0].key]))) == shape, key
        used.add(segments[0].key)
    assert used == set(diffusers)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 83.8


def test_tiled_decode_is_close_to_whole_decode(diffusers_vae):
    """Tiles see only part of the latent (GroupNorm statistics and the mid-block attention are
    global), so tiling is an approximation. Measured on this random tiny VAE: a 40x56 latent in
    16-latent tiles with 6 of overlap is 0.043 mean absolute error from the whole decode (whose mean
    |value| is 0.30); the bound is 0.1."""
    _, folder = diffusers_vae
    vae = load_vae(folder, dtype=torch.float32)
    z = torch.randn(1, 16, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z, tiled=False)
        tiled = vae.decode(z, tiled=True, tile=16, overlap=6)
    assert tiled.shape == whole.shape
    err = (tiled - whole).abs().mean().item()
    assert err <= 0.1, f"mean abs error {err:.3f}"
    assert torch.isfinite(tiled).all()


def test_tile_weights_cover_every_pixel_once(monkeypatch):
    """With a local 'decoder' (nearest x2 upsample), tiling must reproduce the whole decode exactly:
    the blend weights sum to 1 everywhere, including the border tiles of an odd-sized latent."""
    vae = AutoEncoder(from_name("vae-tiny-flux"))

    def local(z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=2.0, mode="nearest")

    monkeypatch.setattr(vae.decoder, "forward", local)
    z = torch.randn(1, 16, 37, 23)
    torch.testing.assert_close(vae._tiled_decode(z, tile=16, overlap=5), local(z))


def test_out_of_memory_falls_back_to_tiles_with_a_warning(diffusers_vae, monkeypatch):
    _, folder = diffusers_vae
    vae = load_vae(folder, dtype=torch.float32)
    real = vae.decoder.forward

    def oom_on_large(z):
        if z.shape[-1] > 16:
            raise torch.OutOfMemoryError("simulated")
        return real(z)

    monkeypatch.setattr(vae.decoder, "forward", oom_on_large)
    z = torch.randn(1, 16, 16, 24)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = vae.decode(z, tile=16, overlap=4)
    assert out.shape == (1, 3, 32, 48)
    with pytest.raises(torch.OutOfMemoryError):
        vae.decode(z, tiled=False)
