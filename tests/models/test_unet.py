"""The SDXL UNet: names and shapes against the official list (tests/data/sdxl_key_shapes.json,
made by tools/sdxl_key_shapes.py from diffusers alone), and parity with diffusers'
UNet2DConditionModel on tiny SDXL-like configs, loaded from a diffusers folder and from a file in
the official layout (whose mapping diffusers' own single-file converter checks)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow.errors import AmbiguousVariantError, FamilyMismatchError, InputError
from fastflow.loading.keymaps import unet_from_diffusers
from fastflow.models import configs
from fastflow.models.unet import UNet
from fastflow.models.vae import AutoEncoder

from ..conftest import tiny_diffusers_unet

LISTS = json.loads((Path(__file__).parent.parent / "data" / "sdxl_key_shapes.json").read_text())
PREFIX = "model.diffusion_model."


def _meta_shapes(model_cls, name):
    with torch.device("meta"):
        model = model_cls(configs.from_name(name))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["sdxl-base", "sdxl-turbo"])
def test_full_size_names_and_shapes_equal_the_official_list(variant):
    ours = _meta_shapes(UNet, variant)
    official = {k.removeprefix(PREFIX): v for k, v in LISTS["sdxl-base_official"].items()}
    assert len(ours) == 1680
    assert sorted(set(official) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


def test_full_size_diffusers_names_map_onto_ours():
    """Every official tensor's diffusers source exists in diffusers' full-size list with the same
    shape, and every diffusers tensor is used once."""
    cfg = configs.from_name("sdxl-base")
    ours = _meta_shapes(UNet, "sdxl-base")
    theirs = LISTS["sdxl-base_diffusers"]
    used = []
    for key, shape in ours.items():
        (seg,) = unet_from_diffusers(key, cfg)
        assert theirs[seg.key] == shape, key
        used.append(seg.key)
    assert sorted(used) == sorted(theirs)


def test_full_size_vae_names_and_shapes_equal_the_official_list():
    ours = _meta_shapes(AutoEncoder, "sdxl-vae")
    official = {k.removeprefix("first_stage_model."): v for k, v in LISTS["sdxl-vae_official"].items()}
    assert sorted(set(official) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


# -- parity with diffusers on tiny configs ---------------------------------------------------------
# sdxl-tiny: diffusers' tiny SDXL test UNet; a 3-level variant with depths 0 / 1 / 2 exercises the
# level arithmetic of the key map (downsamplers, upsampler positions, the mid block)
CASES = {
    "sdxl-tiny": {},
    "three-levels": {"channel_mult": (1, 2, 2), "transformer_depth": (0, 1, 2), "num_res_blocks": 1},
}


def _official_file(ref, cfg, path):
    """ref's weights in the official layout, via our key map; diffusers' single-file converter must
    map the file back onto ref's state dict exactly."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = ref.state_dict()
    with torch.device("meta"):
        keys = list(UNet(cfg).state_dict())
    official = {PREFIX + k: torch.cat([state[s.key] for s in unet_from_diffusers(k, cfg)]) for k in keys}
    back = convert_ldm_unet_checkpoint(dict(official), dict(ref.config))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    save_file({k: v.contiguous() for k, v in official.items()}, path)
    return path


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    name = request.param
    cfg = configs.from_name("sdxl-tiny").replace(name=f"sdxl-tiny-{name}", **CASES[name])
    ref = tiny_diffusers_unet("sdxl-tiny", seed=3, **CASES[name])
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder / "unet")
    _official_file(ref, cfg, folder / "official.safetensors")
    return cfg, ref, folder


def _inputs(cfg, batch=3, h=16, w=24, tokens=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, cfg.in_channels, h, w, generator=g),
        "t": torch.tensor([999.0, 421.0, 1.0][:batch]),
        "ctx": torch.randn(batch, tokens, cfg.context_dim, generator=g),
        "pooled": torch.randn(batch, cfg.pooled_dim, generator=g),
        "ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 1024], [64, 64, 0, 0, 64, 64]])[
            :batch
        ].float(),
    }


def _theirs(ref, i, dtype=torch.float32):
    model = copy.deepcopy(ref).to(dtype)
    with torch.no_grad():
        out = model(
            i["x"].to(dtype),
            i["t"],
            i["ctx"].to(dtype),
            added_cond_kwargs={"text_embeds": i["pooled"].to(dtype), "time_ids": i["ids"].to(dtype)},
        ).sample
    return out.float()


def _ours(model, i):
    with torch.no_grad():
        return model(i["x"], i["t"], i["ctx"], i["pooled"], i["ids"]).float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("source", ["folder", "official"])
def test_fp32_parity(case, source):
    cfg, ref, folder = case
    path = folder / "unet" if source == "folder" else folder / "official.safetensors"
    model = fastflow.load_transformer(path, config=cfg, dtype=torch.float32)
    assert isinstance(model, UNet)
    for shape in [dict(), dict(batch=1, h=8, w=8, tokens=77)]:
        i = _inputs(cfg, **shape)
        assert _rel(_ours(model, i), _theirs(ref, i)) <= 1e-5


def test_bf16_within_twice_diffusers_own_error(case):
    cfg, ref, folder = case
    i = _inputs(cfg)
    exact = _theirs(ref, i)
    theirs = _rel(_theirs(ref, i, torch.bfloat16), exact)
    ours = _rel(_ours(fastflow.load_transformer(folder / "unet", config=cfg, dtype=torch.bfloat16), i), exact)
    assert theirs > 0  # bf16 really rounds
    assert ours <= 2 * theirs, (ours, theirs)


def test_registered_tiny_config_is_detected_and_needs_the_variant_to_tell_base_from_turbo(tmp_path):
    ref = tiny_diffusers_unet("sdxl-tiny", seed=1)
    ref.save_pretrained(tmp_path / "unet")
    with pytest.raises(AmbiguousVariantError, match="sdxl-tiny' or 'sdxl-tiny-turbo"):
        fastflow.load_transformer(tmp_path / "unet")
    model = fastflow.load_transformer(tmp_path / "unet", variant="sdxl-tiny-turbo", dtype=torch.float32)
    assert model.config.turbo and model.config.head_dim == 16 and model.config.time_id_dim == 8


def test_head_width_comes_from_config_json(tmp_path):
    """Head width is invisible in the weights: a folder whose config.json says 8-wide heads gets
    them (and its outputs equal diffusers')."""
    ref = tiny_diffusers_unet("sdxl-tiny", seed=2, head_dim=8)
    ref.save_pretrained(tmp_path / "unet")
    model = fastflow.load_transformer(tmp_path / "unet", variant="sdxl-tiny", dtype=torch.float32)
    assert model.config.head_dim == 8
    i = _inputs(model.config)
    assert _rel(_ours(model, i), _theirs(ref, i)) <= 1e-5


def test_sdxl_file_given_as_another_family_says_what_it_is(case):
    _, _, folder = case
    for family in ("flux", "sd3"):
        with pytest.raises(FamilyMismatchError, match="this is an SDXL UNet, not"):
            fastflow.load_transformer(folder / "official.safetensors", family=family)


def test_bad_inputs_are_typed_errors(case):
    cfg, _, folder = case
    model = fastflow.load_transformer(folder / "unet", config=cfg, dtype=torch.float32)
    i = _inputs(cfg, batch=2)
    f = model.downscale
    bad = [
        dict(x=torch.randn(2, cfg.in_channels, 8 * f + 1, 8)),  # side not a multiple of the downscale
        dict(x=torch.randn(2, cfg.in_channels + 1, 8, 8)),
        dict(ctx=torch.randn(2, 9, cfg.context_dim + 1)),
        dict(pooled=torch.randn(2, cfg.pooled_dim + 1)),
        dict(ids=torch.zeros(2, 5)),
        dict(t=torch.zeros(3)),
    ]
    for change in bad:
        args = {**i, **change}
        with pytest.raises(InputError):
            _ours(model, args)
