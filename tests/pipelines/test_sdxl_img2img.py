"""SDXL image-to-image against diffusers' StableDiffusionXLImg2ImgPipeline on the tiny random SDXL
folder (both load the same files): final latents to 1e-5 and images to 1/255 with the same
generators, diffusers' default strength (0.3), Euler and Euler ancestral, CFG on and off, one or
several prompts; DeepCache composes with it (interval 1 bit-identical)."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from fastflow.errors import InputError
from fastflow.models import configs

from ..conftest import diffusers_sdxl_modules, diffusers_sdxl_scheduler
from .test_controlnet_flux import _gen, _image, _rel

H, W = 32, 48

CASES = {
    "default-strength-cfg": dict(kw=dict(guidance_scale=5.0)),
    "half-strength-two-prompts": dict(kw=dict(strength=0.5, guidance_scale=4.0), prompts=["a seven", "a nine"]),
    "full-strength-no-cfg-ancestral": dict(kw=dict(strength=1.0, guidance_scale=1.0), ancestral=True),
}


def _reference(folder, ancestral):
    cfg = configs.from_name("sdxl-tiny")
    pipe = StableDiffusionXLImg2ImgPipeline(
        **diffusers_sdxl_modules(folder),
        scheduler=diffusers_sdxl_scheduler(cfg, ancestral),
        requires_aesthetics_score=False,  # the base model's (the refiner's is True)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers(pipeline_folders, load, case):
    spec = CASES[case]
    pipe = load("sdxl-tiny")
    ref = _reference(pipeline_folders["sdxl-tiny"], spec.get("ancestral", False))
    prompts = spec.get("prompts", "a handwritten seven")
    # diffusers' img2img pipeline takes no height / width: both run at the image's own size
    kw = dict(image=_image(9, H, W).resize((W, H)), num_inference_steps=6, **spec["kw"])
    sampler = "euler_ancestral" if spec.get("ancestral") else "euler"
    ours = pipe(prompts, generator=_gen(3), sampler=sampler, output_type="latent", **kw)
    theirs = ref(prompts, generator=_gen(3), output_type="latent", **kw).images
    assert _rel(ours.images, theirs) <= 1e-5
    assert ours.images.shape[-2:] == (H // 2, W // 2) and ours.settings["strength"] == spec["kw"].get("strength", 0.3)
    ours_img = pipe(prompts, generator=_gen(3), sampler=sampler, output_type="np", **kw).images
    theirs_img = ref(prompts, generator=_gen(3), output_type="np", **kw).images
    assert np.abs((np.asarray(ours_img) * 255).round() - (np.asarray(theirs_img) * 255).round()).max() <= 1


def test_the_image_matters_and_deepcache_composes(load):
    pipe = load("sdxl-tiny")
    kw = dict(height=H, width=W, num_inference_steps=8, strength=0.8, guidance_scale=5.0, output_type="latent")
    base = pipe("a seven", image=_image(1, H, W), seed=4, **kw)
    other = pipe("a seven", image=_image(2, H, W), seed=4, **kw)
    assert _rel(base.images, other.images) > 1e-3  # the start image is used
    same = pipe("a seven", image=_image(1, H, W), seed=4, cache="deepcache", cache_interval=1, **kw)
    assert torch.equal(same.images, base.images)
    cached = pipe("a seven", image=_image(1, H, W), seed=4, cache="deepcache", cache_interval=2, cache_branch=1, **kw)
    assert cached.stats["work_saved"] > 0.2 and 0 < _rel(cached.images, base.images) < 0.6


def test_bad_input(load):
    pipe = load("sdxl-tiny")
    kw = dict(height=H, width=W, num_inference_steps=4)
    with pytest.raises(InputError, match="strength"):
        pipe("a seven", image=_image(1, H, W), strength=1.5, **kw)
    with pytest.raises(InputError, match="strength needs an input image"):
        pipe("a seven", strength=0.5, **kw)
    with pytest.raises(InputError, match="euler"):
        pipe("a seven", image=_image(1, H, W), sampler="dpmpp_2m", **kw)
