"""The SVD spatio-temporal UNet: names and shapes against the official list (sgm's VideoUNet built
on the meta device: tests/data/svd_unet_official_keys.tsv.gz) and diffusers' full-size list
(tests/data/svd_unet_diffusers_keys.tsv.gz) through the key map; parity with diffusers'
UNetSpatioTemporalConditionModel on tiny random configs, its weights loaded through the key map."""

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from fastflow.errors import InputError
from fastflow.loading.keymaps_svd import svd_unet_from_diffusers
from fastflow.models import configs
from fastflow.models import unet_video as uv
from fastflow.models.unet_video import VideoUNet

DATA = Path(__file__).parent.parent / "data"
PREFIX = "model.diffusion_model."


def _tsv(name: str, prefix: str) -> dict[str, list[int]]:
    rows = gzip.decompress((DATA / name).read_bytes()).decode().splitlines()
    return {k.removeprefix(prefix): json.loads(v) for k, v in (r.split("\t") for r in rows)}


def _meta_shapes(name: str) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = VideoUNet(configs.from_name(name))
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", ["svd", "svd-xt"])
def test_full_size_names_and_shapes_equal_the_official_list(variant):
    ours = _meta_shapes(variant)
    official = _tsv("svd_unet_official_keys.tsv.gz", PREFIX)
    assert len(official) == 1428 and len(ours) == 1428
    assert sorted(set(official) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert sum(torch.Size(v).numel() for v in ours.values()) == 1_524_623_082  # diffusers' count too


def test_full_size_diffusers_names_map_onto_ours():
    """Every official tensor's diffusers source exists in diffusers' full-size list with the same
    shape (no reshapes in this model), and every diffusers tensor is used once."""
    cfg = configs.from_name("svd")
    theirs = _tsv("svd_unet_diffusers_keys.tsv.gz", "unet/")
    used = []
    for key, shape in _meta_shapes("svd").items():
        (seg,) = svd_unet_from_diffusers(key, cfg)
        assert theirs.get(seg.key) == shape, (key, seg.key)
        used.append(seg.key)
    assert sorted(used) == sorted(theirs)


def test_registered_configs():
    svd, xt = configs.from_name("svd"), configs.from_name("svd-xt")
    assert (svd.num_frames, xt.num_frames) == (14, 25) and svd.arch() == xt.arch()
    assert {"svd", "svd-xt"} <= set(configs.list_models("svd")) and "svd-tiny" in configs.list_models(
        "svd", include_tiny=True
    )
    with pytest.raises(ValueError):
        svd.replace(num_heads=(5, 10, 20))


# -- parity with diffusers on tiny configs ---------------------------------------------------------
# svd-tiny: two levels (attention on the first); "three-levels": one ResNet a level, two blocks per
# transformer, attention on two levels, per-level heads (the key map's level arithmetic)
CASES = {
    "svd-tiny": {},
    "three-levels": {
        "channel_mult": (1, 2, 2),
        "num_res_blocks": 1,
        "transformer_depth": (2, 2, 0),
        "transformer_depth_middle": 2,
        "num_heads": (2, 4, 2),
    },
}


def diffusers_svd_unet_config(cfg) -> dict:
    """diffusers UNetSpatioTemporalConditionModel arguments of an SVDUNetConfig."""
    attn = [d > 0 for d in cfg.transformer_depth]
    assert cfg.transformer_depth[-1] in (0, cfg.transformer_depth_middle), "diffusers: mid depth = last level's"
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": tuple(cfg.widths),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in attn),
        "up_block_types": tuple(
            "CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(attn)
        ),
        "transformer_layers_per_block": tuple(d or cfg.transformer_depth_middle for d in cfg.transformer_depth),
        "num_attention_heads": tuple(cfg.num_heads),
        "cross_attention_dim": cfg.context_dim,
        "addition_time_embed_dim": cfg.time_id_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "num_frames": cfg.num_frames,
    }


def tiny_diffusers_svd_unet(cfg, seed: int = 0):
    """Every weight random: norm scales around 1, mix factors anywhere in sigmoid's useful range,
    the rest perturbed around diffusers' init (zero-initialised tensors made non-zero)."""
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    model = UNetSpatioTemporalConditionModel(**diffusers_svd_unet_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("mix_factor"):
                p.copy_(1.5 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p) + 0.5 * p)
    return model


def ours_from(ref, cfg) -> VideoUNet:
    """Our module with ref's weights, through the key map (strict: every tensor of ours filled)."""
    state = ref.state_dict()
    model = VideoUNet(cfg).eval()
    mapped = {k: torch.cat([s.take(state[s.key]) for s in svd_unet_from_diffusers(k, cfg)]) for k in model.state_dict()}
    model.load_state_dict(mapped, strict=True)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    name = request.param
    cfg = configs.from_name("svd-tiny").replace(name=f"svd-tiny-{name}", **CASES[name])
    ref = tiny_diffusers_svd_unet(cfg, seed=5)
    return cfg, ref, ours_from(ref, cfg)


def _inputs(cfg, batch=2, frames=3, h=8, w=12, tokens=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, frames, cfg.in_channels, h, w, generator=g),
        "timestep": torch.tensor([1.7, -0.4][:batch]),  # EDM's 0.25 * ln(sigma)
        "encoder_hidden_states": torch.randn(batch, tokens, cfg.context_dim, generator=g),
        "added_time_ids": torch.tensor([[5.0, 127.0, 0.02], [9.0, 40.0, 0.1]][:batch]),
    }


def _theirs(ref, i):
    with torch.no_grad():
        return ref(**i, return_dict=False)[0]


def _ours(model, i):
    with torch.no_grad():
        return model(**i)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


SHAPES = {
    "3 frames": {},
    "5 frames": {"frames": 5, "h": 4, "w": 8},
    "1 frame": {"frames": 1, "batch": 1},
    "two context tokens": {"tokens": 2},  # the general temporal cross-attention path
    "odd latent size": {"h": 9, "w": 6},  # upsampled to the skip's size, as diffusers' upsample_size
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_fp32_parity(case, shape):
    cfg, ref, model = case
    i = _inputs(cfg, **SHAPES[shape])
    out, expected = _ours(model, i), _theirs(ref, i)
    assert out.shape == expected.shape == (*i["sample"].shape[:2], cfg.out_channels, *i["sample"].shape[-2:])
    assert _rel(out, expected) <= 1e-5


def test_timestep_forms_match_diffusers(case):
    """A Python number, a 0-d tensor and one per sample, as diffusers' forward takes them."""
    cfg, ref, model = case
    i = _inputs(cfg)
    for t in (0.6, torch.tensor(-1.2), torch.tensor([3])):
        j = {**i, "timestep": t}
        assert _rel(_ours(model, j), _theirs(ref, j)) <= 1e-5


def test_frames_interact(case):
    """The temporal layers mix frames: changing the last frame's input changes the first's output."""
    cfg, _, model = case
    i = _inputs(cfg)
    j = copy.deepcopy(i)
    j["sample"][:, -1] += 1.0
    assert _rel(_ours(model, j)[:, 0], _ours(model, i)[:, 0]) > 1e-3


def test_group_norm_eps_per_block_equals_diffusers(case):
    """The eps trap (1e-6 in attention levels and on the way up, 1e-5 elsewhere): every GroupNorm's
    eps equals that of the diffusers module its weight comes from."""
    cfg, ref, model = case
    theirs = dict(ref.named_modules())
    checked = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.GroupNorm):
            (seg,) = svd_unet_from_diffusers(f"{name}.weight", cfg)
            assert module.eps == theirs[seg.key.removesuffix(".weight")].eps, name
            checked += 1
    assert checked > 20


def test_a_wrong_mix_formula_fails_parity(case, monkeypatch):
    """The parity test can fail: the spatial and temporal weights of the AlphaBlender swapped."""
    cfg, ref, model = case

    def swapped(self, x_spatial, x_temporal):
        alpha = torch.sigmoid(self.mix_factor).to(x_spatial.dtype)
        return (1.0 - alpha) * x_spatial + alpha * x_temporal

    monkeypatch.setattr(uv.AlphaBlender, "forward", swapped)
    i = _inputs(cfg)
    assert _rel(_ours(model, i), _theirs(ref, i)) > 1e-3


def test_bad_inputs_are_typed_errors(case):
    cfg, _, model = case
    i = _inputs(cfg)
    bad = {
        "sample": i["sample"][:, 0],  # 4-D
        "encoder_hidden_states": i["encoder_hidden_states"][:1],
        "added_time_ids": i["added_time_ids"][:, :2],
        "timestep": torch.zeros(3),
    }
    for name, value in bad.items():
        with pytest.raises(InputError):
            model(**{**i, name: value})
    with pytest.raises(InputError):
        model(**{**i, "sample": torch.randn(2, 3, 4, 8, 12)})  # 4 channels: the image latents missing


def test_bf16_within_twice_diffusers_own_error(case):
    cfg, ref, model = case
    i = _inputs(cfg)
    exact = _theirs(ref, i)
    low = {k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in i.items()}
    theirs = _rel(_theirs(copy.deepcopy(ref).to(torch.bfloat16), low).float(), exact)
    ours = _rel(_ours(copy.deepcopy(model).to(torch.bfloat16), low).float(), exact)
    assert theirs > 0  # bf16 really rounds
    assert ours <= 2 * theirs, (ours, theirs)
