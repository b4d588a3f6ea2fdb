"""SVD's temporal-decoder VAE against diffusers' AutoencoderKLTemporalDecoder (tiny, random
weights), the pipeline's chunked decode, and the official / diffusers key lists at full size."""

import gzip
import math
from pathlib import Path

import pytest
import torch

from fastflow import errors
from fastflow.loading.keymaps_svd_vae import (
    SVD_VAE_UNUSED_OFFICIAL_PREFIXES,
    svd_vae_from_diffusers,
    svd_vae_official_key,
)
from fastflow.models.vae_video import VIDEO_VAE_CONFIGS, VideoAutoEncoder

KEYS = Path(__file__).parent.parent / "data" / "svd_vae_keys.tsv.gz"  # from sgm's / diffusers' classes on meta


def _lists() -> tuple[dict, dict]:
    official, diffusers = {}, {}
    for line in gzip.decompress(KEYS.read_bytes()).decode().splitlines():
        key, shape = line.split("\t")
        shape = [int(n) for n in shape.strip("[]").split(",") if n.strip()]
        if key.startswith("vae/"):
            diffusers[key[len("vae/") :]] = shape
        else:
            official[key] = shape
    return official, diffusers


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Norm scales near 1, everything else small random: no tensor keeps its init (the mix
    factors start at 0, so they are drawn)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("mix_factor"):
                p.copy_(noise)
            elif "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.mul_(1.0 + 0.2 * noise).add_(0.02 * noise)


def _tiny_diffusers(seed: int = 0):
    from diffusers import AutoencoderKLTemporalDecoder

    cfg = VIDEO_VAE_CONFIGS["svd-vae-tiny"]
    torch.manual_seed(seed)
    ref = AutoencoderKLTemporalDecoder(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.ch_mult),
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,  # 2: the mid block's attention runs
        latent_channels=cfg.z_channels,
        scaling_factor=cfg.scale_factor,
    ).eval()
    _randomize(ref, seed)
    return ref


def _convert(ref) -> VideoAutoEncoder:
    ours = VideoAutoEncoder(VIDEO_VAE_CONFIGS["svd-vae-tiny"]).eval()
    source = ref.state_dict()
    state, used = {}, set()
    for key in ours.state_dict():
        pieces = []
        for seg in svd_vae_from_diffusers(key, ours.config):
            pieces.append(seg.take(source[seg.key]))
            used.add(seg.key)
        state[key] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    assert used == set(source)  # every diffusers tensor lands somewhere
    ours.load_state_dict(state, strict=True)
    return ours


@pytest.fixture(scope="module")
def pair():
    ref = _tiny_diffusers(seed=3)
    return ref, _convert(ref)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_encode_matches_diffusers_posterior(pair):
    ref, ours = pair
    x = torch.rand(3, 3, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, std = ours.posterior(x)
        assert _rel(mean, dist.mean) <= 1e-5
        assert _rel(ours.encode(x), dist.mode()) <= 1e-5
        assert _rel(std, dist.std) <= 1e-5
    assert mean.shape == (3, 4, 12, 20)


@pytest.mark.parametrize("frames", [3, 5])
def test_decode_matches_diffusers(pair, frames):
    ref, ours = pair
    g = torch.Generator().manual_seed(frames)
    z = torch.randn(2 * frames, 4, 6, 10, generator=g)  # two clips
    with torch.no_grad():
        expected = ref.decode(z, num_frames=frames).sample
        got = ours.decode(z, frames)
        assert _rel(got, expected) <= 1e-5
        # the frames of a clip see each other: decoding the clips one by one gives the same,
        # decoding frame by frame does not
        first = ours.decode(z[:frames], frames)
        assert _rel(first, expected[:frames]) <= 1e-5
        assert _rel(ours.decode(z[:frames], 1), expected[:frames]) > 1e-3


def test_temporal_block_matches_diffusers_on_small_activations(pair):
    """Activations with a variance near the GroupNorm eps: the temporal norms' eps (1e-5, unlike
    the spatial 1e-6) is visible."""
    ref, ours = pair
    x = 1e-3 * torch.randn(2, 64, 3, 4, 5, generator=torch.Generator().manual_seed(7))  # [B, C, F, h, w]
    with torch.no_grad():
        expected = ref.decoder.mid_block.resnets[0].temporal_res_block(x, None)
        got = ours.decoder.mid.block_1.time_stack(x)
    assert _rel(got - x, expected - x) <= 1e-5


def _pipeline_decode_latents(vae, latents, num_frames, chunk):
    """diffusers' StableVideoDiffusionPipeline.decode_latents, unbound (it uses only self.vae)."""
    from diffusers import StableVideoDiffusionPipeline

    holder = type("Holder", (), {"vae": vae})()
    return StableVideoDiffusionPipeline.decode_latents(holder, latents, num_frames, chunk)


@pytest.mark.parametrize(("batch", "frames", "chunk"), [(1, 5, 2), (2, 3, 2), (1, 4, 4), (2, 5, 3), (1, 3, 8)])
def test_chunked_decode_matches_the_pipeline(pair, batch, frames, chunk):
    ref, ours = pair
    latents = torch.randn(batch, frames, 4, 4, 6, generator=torch.Generator().manual_seed(10 * frames + chunk))
    seen = []
    with torch.no_grad():
        expected = _pipeline_decode_latents(ref, latents, frames, chunk)
        got = ours.decode_chunks(latents, frames, chunk, callback=lambda done, total: seen.append((done, total)))
        flat = ours.decode_chunks(latents.flatten(0, 1), frames, chunk)
    assert got.shape == expected.shape == (batch, 3, frames, 8, 12)
    assert got.dtype == torch.float32
    assert _rel(got, expected) <= 1e-5
    assert torch.equal(flat, got)
    total = batch * frames
    assert seen == [(min(i + chunk, total), total) for i in range(0, total, chunk)]


def test_chunk_size_changes_the_frames(pair):
    """Each chunk is its own clip (zero-padded temporal convs, per-clip GroupNorm statistics)."""
    _, ours = pair
    latents = torch.randn(1, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = ours.decode_chunks(latents, 4)
        halves = ours.decode_chunks(latents, 4, 2)
    assert _rel(halves, whole) > 1e-3


def test_bad_inputs_are_refused(pair):
    _, ours = pair
    with pytest.raises(errors.InputError, match="multiples of 2"):
        ours.encode(torch.zeros(1, 3, 9, 8))
    with pytest.raises(errors.InputError, match="divisor"):
        ours.decode(torch.zeros(5, 4, 2, 2), 2)
    with pytest.raises(errors.InputError, match="latents must be"):
        ours.decode(torch.zeros(4, 3, 2, 2), 2)
    with pytest.raises(errors.InputError, match="chunk size"):
        ours.decode_chunks(torch.zeros(1, 2, 4, 2, 2), 2, 0)
    with pytest.raises(errors.InputError, match="frames"):
        ours.decode_chunks(torch.zeros(1, 3, 4, 2, 2), 2, 1)
    with pytest.raises(errors.InputError, match="32 GroupNorm"):
        VIDEO_VAE_CONFIGS["svd-vae-tiny"].replace(ch=16)


def test_float16_encode_runs_in_float32_like_the_pipeline(pair):
    """force_upcast: diffusers' pipeline encodes a float16 VAE in float32 and casts the latent back."""
    ref, ours = pair
    half = _convert(ref).half()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        expected = ours.encode(x).half()
        got = half.encode(x)
        assert got.dtype == torch.float16
        # the float16 weights are rounded copies of the float32 ones: close, not equal
        assert _rel(got.float(), expected.float()) <= 5e-3
        assert half.encoder.conv_in.weight.dtype == torch.float16  # the module is not touched


def test_full_size_names_and_shapes():
    official, diffusers = _lists()
    assert len(official) == 372 + 108 and len(diffusers) == 374
    with torch.device("meta"):
        model = VideoAutoEncoder(VIDEO_VAE_CONFIGS["svd-vae"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    # first_stage_model.* is our layout without quant_conv
    first_stage = {k[len("first_stage_model.") :]: v for k, v in official.items() if k.startswith("first_stage_model.")}
    assert first_stage == {k: v for k, v in ours.items() if not k.startswith("quant_conv.")}
    # where the official loader reads each tensor: every key there, same shape
    for key, shape in ours.items():
        assert official[svd_vae_official_key(key)] == shape, key
    # the embedders.3 encoder is the same architecture as first_stage_model's
    for key in (k for k in ours if k.startswith("encoder.")):
        assert official[f"conditioner.embedders.3.encoder.{key}"] == official[f"first_stage_model.{key}"]
    read = {svd_vae_official_key(k) for k in ours}
    assert all(k in read or k.startswith(SVD_VAE_UNUSED_OFFICIAL_PREFIXES) for k in official)
    # diffusers' folder names through the key map onto the same
    used = set()
    for key, shape in ours.items():
        (segment,) = svd_vae_from_diffusers(key, model.config)
        assert segment.key in diffusers, key
        assert list(segment.shape(tuple(diffusers[segment.key]))) == shape, key
        used.add(segment.key)
    assert used == set(diffusers)
    numbers = sum(math.prod(s) for s in ours.values())
    assert numbers == sum(math.prod(s) for s in diffusers.values()) == 97_742_847


def test_unknown_keys_are_named():
    cfg = VIDEO_VAE_CONFIGS["svd-vae"]
    with pytest.raises(KeyError, match="time_stack.emb_layers"):
        svd_vae_from_diffusers("decoder.mid.block_1.time_stack.emb_layers.1.weight", cfg)
    with pytest.raises(KeyError, match="post_quant_conv"):
        svd_vae_official_key("post_quant_conv.weight")
