"""Image-to-image against diffusers' FluxImg2ImgPipeline and StableDiffusion3Img2ImgPipeline on
tiny random pipelines: same folders, same input image, same generator (diffusers draws the VAE
posterior sample, then the noise); final latents agree to fp32 tolerance and images to 1/255."""

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
)
from PIL import Image

from fastflow import errors
from fastflow.models.flux import unpack_latents

from ..conftest import diffusers_flux_scheduler
from .test_parity import SD3_W, _modules, _rel, _to_uint8

H, W = 24, 40


def _image(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "variant,guidance,strength,steps",
    [("flux-tiny-dev", 3.5, 0.6, 4), ("flux-tiny-schnell", 0.0, 0.75, 4), ("flux-tiny-dev", 3.5, 1.0, 3)],
)
def test_flux_img2img_equals_diffusers(pipeline_folders, load, variant, guidance, strength, steps):
    pipe = load(variant)
    txt, y = pipe.text_encoder(["make it a seven"])
    ref = FluxImg2ImgPipeline(
        scheduler=diffusers_flux_scheduler(dynamic=bool(guidance)),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        **_modules(pipeline_folders[variant], FluxTransformer2DModel),
    )  # fmt: skip
    image = _image(W, H)
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": steps, "guidance_scale": guidance}
    ours = pipe(image=image, strength=strength, generator=_gen(3), output_type="latent", **kw)
    theirs = ref(image=image, strength=strength, height=H, width=W, generator=_gen(3), output_type="latent", **kw)
    assert (ours.settings["height"], ours.settings["width"]) == (H, W)  # defaults to the image's size
    assert ours.settings["strength"] == strength
    assert _rel(ours.images, unpack_latents(theirs.images, H // 2, W // 2)) <= 1e-5
    ours_img = _to_uint8(pipe(image=image, strength=strength, generator=_gen(3), output_type="np", **kw).images)
    theirs_img = ref(image=image, strength=strength, height=H, width=W, generator=_gen(3), output_type="np", **kw)
    assert np.abs(ours_img.astype(int) - _to_uint8(theirs_img.images).astype(int)).max() <= 1


def test_sd3_img2img_equals_diffusers(pipeline_folders, load):
    pipe = load("sd3.5-tiny-medium")
    ctx, pooled = pipe.text_encoder(["make it a seven"])
    neg_ctx, neg_pooled = pipe.text_encoder([""])
    none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    ref = StableDiffusion3Img2ImgPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **none,
        **_modules(pipeline_folders["sd3.5-tiny-medium"], SD3Transformer2DModel),
    )
    image = _image(SD3_W, H, seed=1)
    kw = {
        "prompt_embeds": ctx, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg_ctx,
        "negative_pooled_prompt_embeds": neg_pooled, "num_inference_steps": 8, "guidance_scale": 4.5,
    }  # fmt: skip
    ours = pipe(image=image, strength=0.7, generator=_gen(5), sampler="euler", output_type="latent", **kw).images
    theirs = ref(image=image, strength=0.7, height=H, width=SD3_W, generator=_gen(5), output_type="latent", **kw).images
    assert _rel(ours, theirs) <= 1e-5
    ours_img = _to_uint8(
        pipe(image=image, strength=0.7, generator=_gen(5), sampler="euler", output_type="np", **kw).images
    )
    size = {"height": H, "width": SD3_W}
    theirs_img = _to_uint8(ref(image=image, strength=0.7, generator=_gen(5), output_type="np", **size, **kw).images)
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


def test_strength_runs_the_last_steps_and_seeds_are_per_image(load):
    pipe = load("flux-tiny-schnell")
    image = _image(W, H)
    calls = []
    pipe("a seven", image=image, strength=0.5, num_inference_steps=8, seed=1,
         callback=lambda i, n, x: calls.append((i, n)))  # fmt: skip
    assert [n for _, n in calls] == [4] * 4  # int(8 - 8 * 0.5) = 4 steps skipped
    alone = pipe("a seven", image=image, strength=0.5, seed=11, output_type="latent", num_inference_steps=4).images
    batch = pipe("a seven", image=image, strength=0.5, seed=10, num_images_per_prompt=2, output_type="latent",
                 num_inference_steps=4)  # fmt: skip
    assert batch.seeds == [10, 11]
    torch.testing.assert_close(alone[0], batch.images[1], rtol=1e-5, atol=1e-6)
    near = pipe("a seven", image=image, strength=0.2, seed=11, output_type="latent", num_inference_steps=10).images
    far = pipe("a seven", image=image, strength=1.0, seed=11, output_type="latent", num_inference_steps=10).images
    source = pipe.vae.encode(torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None])
    assert (near - source).norm() < (far - source).norm()  # low strength stays close to the input


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, "high", True])
def test_bad_strength(load, strength):
    pipe = load("flux-tiny-schnell")
    with pytest.raises(errors.InputError, match="strength"):
        pipe("a seven", image=_image(W, H), strength=strength, num_inference_steps=2)


def test_strength_errors(load):
    steps = []
    load("flux-tiny-schnell")("a seven", image=_image(W, H), strength=0.01, num_inference_steps=4,
                              callback=lambda i, n, x: steps.append(n))  # fmt: skip
    assert steps == [1]  # any strength > 0 runs at least the last step (int(4 - 0.04) = 3 skipped)
    with pytest.raises(errors.InputError, match="needs an input image"):
        load("flux-tiny-schnell")("a seven", strength=0.5, num_inference_steps=2)
    with pytest.raises(errors.InputError, match="Kontext"):
        load("flux-tiny-kontext")("make it red", image=_image(W, H), strength=0.5, num_inference_steps=2)
    with pytest.raises(errors.InputError, match="needs an input image"):
        load("sd3.5-tiny-medium")("a seven", strength=0.5, num_inference_steps=2)


def test_default_size_is_the_image_scaled_to_the_trained_area(load):
    from types import SimpleNamespace

    pipe = load("flux-tiny-schnell")
    th, tw = pipe.default_size
    request = SimpleNamespace(image=_image(8 * tw, 4 * th), strength=None)
    h, w = pipe.image_size(request)
    assert h * w <= th * tw and h % pipe.multiple == 0 and w % pipe.multiple == 0
    assert abs(w / h - 2.0) < 0.1  # the aspect ratio is kept (up to rounding to the multiple)
    assert request.strength == 0.6  # diffusers' default
    small = SimpleNamespace(image=_image(W + 3, H + 3), strength=0.3)
    assert pipe.image_size(small) == (H, W) and small.strength == 0.3  # smaller images keep their size
