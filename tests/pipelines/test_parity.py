"""End-to-end parity with diffusers' FluxPipeline, FluxKontextPipeline and StableDiffusion3Pipeline on
tiny random-weight models: the same folders are loaded by both, given the same initial noise and
prompt embeddings; final latents agree to fp32 tolerance and decoded images to 1/255 per pixel."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers import FluxPipeline as DiffusersFlux
from PIL import Image

from fastflow.models.flux import pack_latents, unpack_latents

from ..conftest import diffusers_flux_scheduler

H, W = 24, 40  # the tiny VAE downsamples 2x: a 12x20 latent, 6x10 tokens
SD3_W = 32  # the tiny MMDiT's stored pos_embed is 8x8 patches: at most 32 px per side


def _modules(folder, transformer_cls):
    return {
        "vae": AutoencoderKL.from_pretrained(folder / "vae"),
        "transformer": transformer_cls.from_pretrained(folder / "transformer"),
    }


def diffusers_flux(folder, dynamic: bool):
    """diffusers' FluxPipeline on a tiny folder, without text encoders (embeddings are passed)."""
    return DiffusersFlux(
        scheduler=diffusers_flux_scheduler(dynamic=dynamic),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        **_modules(folder, FluxTransformer2DModel),
    )


def diffusers_sd3(folder):
    """diffusers' StableDiffusion3Pipeline on a tiny folder, without text encoders."""
    none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **none, **_modules(folder, SD3Transformer2DModel)
    )


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _to_uint8(np_float):
    return (np_float * 255).round().astype(np.uint8)


@pytest.mark.parametrize("variant,guidance", [("flux-tiny-dev", 3.5), ("flux-tiny-schnell", 0.0)])
def test_flux(pipeline_folders, load, variant, guidance):
    pipe = load(variant)
    txt, y = pipe.text_encoder(["a handwritten seven", "the digit 3"])
    noise = torch.randn(2, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    ref = diffusers_flux(pipeline_folders[variant], dynamic=bool(guidance))
    kw = {
        "prompt_embeds": txt,
        "pooled_prompt_embeds": y,
        "height": H,
        "width": W,
        "num_inference_steps": 4,
        "guidance_scale": guidance,
    }
    ours = pipe(latents=noise, output_type="latent", **kw).images
    theirs = unpack_latents(ref(latents=pack_latents(noise), output_type="latent", **kw).images, H // 2, W // 2)
    assert _rel(ours, theirs) <= 1e-5
    ours_img = _to_uint8(pipe(latents=noise, output_type="np", **kw).images)
    theirs_img = _to_uint8(ref(latents=pack_latents(noise), output_type="np", **kw).images)
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


def test_flux_kontext(pipeline_folders, load):
    pipe = load("flux-tiny-kontext")
    txt, y = pipe.text_encoder(["make it red"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # 48 wide, 32 high
    noise = torch.randn(1, 16, 16, 24, generator=torch.Generator().manual_seed(1))
    ref = FluxKontextPipeline(
        scheduler=diffusers_flux_scheduler(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        **_modules(pipeline_folders["flux-tiny-kontext"], FluxTransformer2DModel),
    )
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": 3, "guidance_scale": 2.5}
    ours = pipe(image=image, latents=noise, auto_resize=False, output_type="latent", **kw)
    assert (ours.settings["height"], ours.settings["width"]) == (32, 48)  # defaults to the input's size
    theirs = ref(
        image=image,
        latents=pack_latents(noise),
        height=32,
        width=48,
        max_area=32 * 48,
        _auto_resize=False,
        output_type="latent",
        **kw,
    ).images
    assert _rel(ours.images, unpack_latents(theirs, 16, 24)) <= 1e-5
    ours_img = _to_uint8(pipe(image=image, latents=noise, auto_resize=False, output_type="np", **kw).images)
    theirs_img = _to_uint8(
        ref(
            image=image,
            latents=pack_latents(noise),
            height=32,
            width=48,
            max_area=32 * 48,
            _auto_resize=False,
            output_type="np",
            **kw,
        ).images
    )
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


@pytest.mark.parametrize("slg", [None, [1]], ids=["cfg", "cfg+slg"])
def test_sd3(pipeline_folders, load, slg):
    pipe = load("sd3.5-tiny-medium")
    ctx, pooled = pipe.text_encoder(["a handwritten seven"])
    neg_ctx, neg_pooled = pipe.text_encoder([""])
    noise = torch.randn(1, 16, H // 2, SD3_W // 2, generator=torch.Generator().manual_seed(2))
    ref = diffusers_sd3(pipeline_folders["sd3.5-tiny-medium"])
    kw = {
        "prompt_embeds": ctx,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": neg_ctx,
        "negative_pooled_prompt_embeds": neg_pooled,
        "height": H,
        "width": SD3_W,
        "num_inference_steps": 10,
        "guidance_scale": 4.5,
        "skip_guidance_layers": slg,
    }
    ours = pipe(latents=noise, sampler="euler", output_type="latent", **kw).images
    theirs = ref(latents=noise, output_type="latent", **kw).images
    assert _rel(ours, theirs) <= 1e-5
    ours_img = _to_uint8(pipe(latents=noise, sampler="euler", output_type="np", **kw).images)
    theirs_img = _to_uint8(ref(latents=noise, output_type="np", **kw).images)
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


def test_sd3_prompts_match_the_embeddings_path(load):
    """Encoding inside the pipeline (prompt="..."; negative "") equals passing the embeddings."""
    pipe = load("sd3.5-tiny-medium")
    ctx, pooled = pipe.text_encoder(["a cat"])
    neg_ctx, neg_pooled = pipe.text_encoder([""])
    kw = {"height": H, "width": SD3_W, "num_inference_steps": 3, "seed": 5, "output_type": "latent"}
    a = pipe("a cat", **kw).images
    b = pipe(
        prompt_embeds=ctx,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg_ctx,
        negative_pooled_prompt_embeds=neg_pooled,
        **kw,
    ).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flux_true_cfg(pipeline_folders, load):
    """diffusers' optional true CFG (negative prompt, true_cfg_scale), used by the embedded model."""
    pipe = load("flux-tiny-schnell")
    txt, y = pipe.text_encoder(["a handwritten seven"])
    neg_txt, neg_y = pipe.text_encoder([""])
    noise = torch.randn(1, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(4))
    ref = diffusers_flux(pipeline_folders["flux-tiny-schnell"], dynamic=False)
    kw = {
        "prompt_embeds": txt,
        "pooled_prompt_embeds": y,
        "negative_prompt_embeds": neg_txt,
        "negative_pooled_prompt_embeds": neg_y,
        "true_cfg_scale": 3.0,
        "height": H,
        "width": W,
        "num_inference_steps": 3,
    }
    ours = pipe(latents=noise, output_type="latent", **kw)
    assert ours.settings["true_cfg_scale"] == 3.0
    theirs = unpack_latents(ref(latents=pack_latents(noise), output_type="latent", **kw).images, H // 2, W // 2)
    assert _rel(ours.images, theirs) <= 1e-5
    plain = pipe(latents=noise, output_type="latent", **{**kw, "true_cfg_scale": 1.0}).images
    assert _rel(ours.images, plain) > 1e-3  # guidance changes the result
