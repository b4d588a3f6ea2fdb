"""SVD's CLIP image encoder (models/clip_vision.py), its open_clip key map
(loading/keymaps_clip_vision.py) and the image preprocessing (pipelines/video_images.py) against the
references: transformers' CLIPVisionModelWithProjection on tiny random configs, diffusers'
``_resize_with_antialiasing`` + the CLIPImageProcessor normalisation and
``StableVideoDiffusionPipeline._encode_image`` itself; the full-size ViT-H/14 layout against
transformers' model built on the meta device and against the official single files' open_clip names
(``tests/data/svd_openclip_visual_key_shapes.tsv.gz``: 392 keys written from ComfyUI's converter
and open_clip's layout, inferred, not read from a real file)."""

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipeline,
    _resize_with_antialiasing,
)
from diffusers.video_processor import VideoProcessor
from PIL import Image
from transformers import CLIPImageProcessor
from transformers import CLIPVisionConfig as HFVisionConfig
from transformers import CLIPVisionModelWithProjection as HFVisionModel

from fastflow.errors import InputError
from fastflow.loading.keymaps_clip_vision import (
    SVD_OPENCLIP_VISUAL_PREFIX,
    clip_vision_from_openclip,
    clip_vision_openclip_plan,
)
from fastflow.loading.plan import on_meta
from fastflow.models.clip_vision import SVD_IMAGE_ENCODER, CLIPVisionConfig, CLIPVisionModelWithProjection
from fastflow.pipelines.video_images import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    antialias_kernel_size,
    antialias_sigma,
    clip_pixels,
    image_embeddings,
    resize_antialiased,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}  # the fp32 parity bound
PRE_TOL = {"rtol": 1e-6, "atol": 1e-6}  # preprocessing
DATA = Path(__file__).parent.parent / "data"

# stabilityai/stable-video-diffusion-img2vid(-xt)/image_encoder/config.json (the math fields)
HUB_IMAGE_ENCODER = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
    "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "num_channels": 3,
}  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm scales near 1, everything else small random: no tensor keeps its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def _tiny(act: str = "gelu", seed: int = 0, **kw):
    fields = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=28,
        patch_size=7, projection_dim=24, hidden_act=act, layer_norm_eps=1e-5, num_channels=3,
    )  # fmt: skip
    fields.update(kw)
    ref = _randomize(HFVisionModel(HFVisionConfig(**fields, attention_dropout=0.0)), seed)
    ours = CLIPVisionModelWithProjection(CLIPVisionConfig(**fields))
    return ref, ours


def _pixels(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- the encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_encoder_equals_transformers(act):
    ref, ours = _tiny(act)
    assert set(ours.state_dict()) == set(ref.state_dict())  # the published folder's names
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = _pixels(2, 28)
    with torch.no_grad():
        want, got = ref(pixel_values=x), ours(x)
        pooled = ref.vision_model(pixel_values=x).pooler_output
    torch.testing.assert_close(got.image_embeds, want.image_embeds, **TOL)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(got.pooler_output, pooled, **TOL)
    assert got.image_embeds.shape == (2, 24)
    # the tower is bidirectional: a causal mask would change the class token's state
    assert not all(layer.self_attn.causal for layer in ours.vision_model.encoder.layers)


def test_encoder_refuses_wrong_sizes():
    _, ours = _tiny()
    with pytest.raises(InputError, match="28, 28"):
        ours(_pixels(1, 32))
    with pytest.raises(InputError, match="check the image encoder"):
        CLIPVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(InputError, match="not implemented"):
        CLIPVisionConfig(hidden_act="swish-ish")


# -- the open_clip layout of the official single files --------------------------------------------


def _to_openclip(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """transformers' names -> open_clip's VisionTransformer names, written out by hand."""
    vm = "vision_model."
    out = {
        "class_embedding": state[vm + "embeddings.class_embedding"],
        "conv1.weight": state[vm + "embeddings.patch_embedding.weight"],
        "positional_embedding": state[vm + "embeddings.position_embedding.weight"],
        "ln_pre.weight": state[vm + "pre_layrnorm.weight"],
        "ln_pre.bias": state[vm + "pre_layrnorm.bias"],
        "ln_post.weight": state[vm + "post_layernorm.weight"],
        "ln_post.bias": state[vm + "post_layernorm.bias"],
        "proj": state["visual_projection.weight"].t().contiguous(),
    }
    for i in range(layers):
        src, dst = f"{vm}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def test_openclip_names_load_to_equal_outputs():
    ref, ours = _tiny(seed=3)
    openclip = {SVD_OPENCLIP_VISUAL_PREFIX + k: v for k, v in _to_openclip(ref.state_dict(), 3).items()}
    plan = clip_vision_openclip_plan(ours.state_dict().keys())
    used = [s.key for segs in plan.values() for s in segs]
    assert set(used) == set(openclip)  # every file tensor used; in_proj as its three thirds:
    assert sorted(used) == sorted([*openclip, *(k for k in openclip if ".in_proj_" in k for _ in range(2))])
    state = {k: torch.cat([s.take(openclip[s.key]) for s in segs]) for k, segs in plan.items()}
    ours.load_state_dict(state, strict=True)
    ours.eval()
    x = _pixels(3, 28, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).image_embeds, ref(pixel_values=x).image_embeds, **TOL)
    with pytest.raises(KeyError):
        clip_vision_from_openclip("vision_model.something_else.weight")


# -- full size: ViT-H/14 --------------------------------------------------------------------------


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_h():
    with on_meta():
        return CLIPVisionModelWithProjection(SVD_IMAGE_ENCODER)


def test_full_size_keys_equal_transformers(vit_h):
    assert {k: getattr(SVD_IMAGE_ENCODER, k) for k in HUB_IMAGE_ENCODER} == HUB_IMAGE_ENCODER
    with torch.device("meta"):
        ref = HFVisionModel(HFVisionConfig(**HUB_IMAGE_ENCODER))
    ours = _shapes(vit_h)
    assert ours == _shapes(ref)
    assert len(ours) == 520 and sum(np.prod(s) for s in ours.values()) == 632_076_800


def test_full_size_keys_equal_official_openclip_list(vit_h):
    with gzip.open(DATA / "svd_openclip_visual_key_shapes.tsv.gz", "rt") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    official = {k: tuple(json.loads(s)) for k, s in rows}
    assert len(official) == 392 and all(k.startswith(SVD_OPENCLIP_VISUAL_PREFIX) for k in official)
    expected = _shapes(vit_h)
    plan = clip_vision_openclip_plan(expected)
    used = [s.key for segs in plan.values() for s in segs]
    assert set(used) == set(official)  # nothing missing, nothing left over; in_proj as its thirds
    assert len(used) == len(official) + 2 * 2 * 32
    for key, segs in plan.items():
        pieces = [s.shape(official[s.key]) for s in segs]
        assert (sum(p[0] for p in pieces), *pieces[0][1:]) == expected[key], key


# -- preprocessing ----------------------------------------------------------------------------------

SIZES = [(576, 1024), (1024, 576), (300, 301), (100, 150), (224, 224), (40, 500), (61, 47)]


def _diffusers_pixels(images) -> torch.Tensor:
    """diffusers' _encode_image steps for PIL images, up to the encoder's input."""
    x = VideoProcessor.numpy_to_pt(VideoProcessor.pil_to_numpy(images))
    x = (_resize_with_antialiasing(x * 2.0 - 1.0, (224, 224)) + 1.0) / 2.0
    return _normalise(x)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    extractor = CLIPImageProcessor(image_mean=list(CLIP_IMAGE_MEAN), image_std=list(CLIP_IMAGE_STD))
    out = extractor(
        images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    )
    return out.pixel_values


def _random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", SIZES)
def test_resize_equals_diffusers(hw):
    x = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(hw[0] * 7 + hw[1])) * 2 - 1
    torch.testing.assert_close(resize_antialiased(x, (224, 224)), _resize_with_antialiasing(x, (224, 224)), **PRE_TOL)


def test_kernel_rule():
    sigmas = antialias_sigma(576, 224), antialias_sigma(1024, 224)
    assert sigmas == pytest.approx((0.7857142857, 1.7857142857))
    assert (antialias_kernel_size(sigmas[0]), antialias_kernel_size(sigmas[1])) == (3, 7)
    assert antialias_sigma(100, 224) == 0.001 and antialias_kernel_size(0.001) == 3
    assert antialias_kernel_size(1.0) == 5  # 4 taps, made odd


@pytest.mark.parametrize("hw", SIZES)
def test_clip_pixels_equal_diffusers(hw):
    images = [_random_image(*hw, seed=i + hw[0]) for i in range(2)]
    got = clip_pixels(images)
    assert got.shape == (2, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, _diffusers_pixels(images), **PRE_TOL)


def test_clip_pixels_tensors():
    image = _random_image(300, 500, seed=9)
    as_tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    # another size: resized as the same picture given as PIL
    torch.testing.assert_close(clip_pixels(as_tensor), clip_pixels(image), rtol=0, atol=0)
    # already 224: diffusers' tensor path, normalisation only
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(clip_pixels(x), _normalise(x), **PRE_TOL)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        clip_pixels(x * 2 - 1)
    with pytest.raises(InputError, match="one size"):
        clip_pixels([_random_image(30, 40, 1), _random_image(40, 30, 2)])
    with pytest.raises(InputError, match="too thin"):
        clip_pixels(torch.rand(1, 3, 1, 500))


@pytest.mark.parametrize(("num_videos", "guidance"), [(1, False), (2, True)])
def test_image_embeddings_equal_diffusers_encode_image(num_videos, guidance):
    ref, ours = _tiny(seed=7, image_size=224, patch_size=32)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    images = [_random_image(200, 320, seed=11), _random_image(200, 320, seed=12)]
    pipe = SimpleNamespace(
        image_encoder=ref,
        feature_extractor=CLIPImageProcessor(image_mean=list(CLIP_IMAGE_MEAN), image_std=list(CLIP_IMAGE_STD)),
        video_processor=VideoProcessor(do_resize=True, vae_scale_factor=8),
    )
    with torch.no_grad():
        want = StableVideoDiffusionPipeline._encode_image(pipe, images, "cpu", num_videos, guidance)
    got = image_embeddings(ours, images, num_videos=num_videos, guidance=guidance)
    assert got.shape == want.shape == ((2 if guidance else 1) * 2 * num_videos, 1, 24)
    torch.testing.assert_close(got, want, **TOL)


def test_half_precision_encoder_takes_fp32_pixels():
    ref, ours = _tiny(seed=8, image_size=224, patch_size=32)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.eval().to(torch.bfloat16)
    images = [_random_image(90, 160, seed=13)]
    got = image_embeddings(ours, images, guidance=True)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 1, 24)
    assert torch.count_nonzero(got[0]) == 0  # the unconditional half
    with torch.no_grad():
        want = ref(pixel_values=clip_pixels(images)).image_embeds
    torch.testing.assert_close(got[1].float(), want, rtol=0.05, atol=0.05)
