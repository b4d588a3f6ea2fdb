"""ControlNets with image-to-image and inpainting: fastflow against diffusers'
FluxControlNetImg2ImgPipeline and FluxControlNetInpaintPipeline on the tiny FLUX.1 dev folder and
ControlNets of tests/pipelines/test_controlnet_flux.py, StableDiffusionXLControlNetInpaintPipeline
(4- and 9-channel UNets) on test_controlnet.py's (latents to 1e-5 relative, images to 1/255):
the keep window over the steps strength leaves, strength's edge cases, several images / nets,
padding_mask_crop; the refused combinations (typed errors before any work)."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fastflow.errors import InputError
from fastflow.models.flux import unpack_latents
from fastflow.pipelines import masks

from ..conftest import tiny_diffusers_unet, tiny_pipeline_folder
from . import test_controlnet, test_controlnet_flux
from .test_controlnet_flux import H, W, _gen, _image, _load, _rel

folders = test_controlnet_flux.folders  # the tiny FLUX.1 dev folder and ControlNets (a module fixture)


def _mask(h=H, w=W, box=(0.25, 0.2, 0.7, 0.8)):
    a = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    a[int(y1 * h) : int(y2 * h), int(x1 * w) : int(x2 * w)] = 255
    return Image.fromarray(a)


FLUX_CASES = {
    # 5 steps at strength 0.6 run 3: the window 0.34 .. 1 leaves out steps 0 and 1 of those 3
    "img2img-window": dict(nets=("cn-a",), kw=dict(strength=0.6, control_guidance_start=0.34)),
    "img2img-full-strength-two-images": dict(nets=("cn-a",), kw=dict(strength=1.0, control_guidance_end=0.5), n=2),
    "img2img-one-step": dict(nets=("cn-a",), kw=dict(strength=0.2, controlnet_conditioning_scale=1.4)),
    "img2img-two-nets": dict(
        nets=("cn-a", "cn-union"),
        kw=dict(
            strength=0.8,
            controlnet_conditioning_scale=[0.6, 1.1],
            control_guidance_end=[0.5, 1.0],
            control_mode=[None, 1],
        ),  # fmt: skip
    ),
    "inpaint-window": dict(nets=("cn-a",), kw=dict(strength=0.8, control_guidance_end=0.6), mask=True),
    "inpaint-union-two-images": dict(nets=("cn-union",), kw=dict(strength=1.0, control_mode=2), mask=True, n=2),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_equals_diffusers(folders, case):
    spec = FLUX_CASES[case]
    nets, n = spec["nets"], spec.get("n", 1)
    pipe = _load(folders["flux"], [folders[k] for k in nets] if len(nets) > 1 else folders[nets[0]])
    txt, y = pipe.text_encoder(["a house"])
    controls = [_image(i + 1) for i in range(len(nets))]
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, num_inference_steps=5, guidance_scale=3.5, height=H,
              width=W, num_images_per_prompt=n, control_image=controls if len(nets) > 1 else controls[0],
              image=_image(9), **spec["kw"])  # fmt: skip
    cls = FluxControlNetImg2ImgPipeline
    if spec.get("mask"):
        kw.update(mask_image=_mask(), image=_image(9).resize((W, H)))  # a mask of the image's aspect
        cls = FluxControlNetInpaintPipeline
    gens = lambda: _gen(5)  # noqa: E731 (one generator: diffusers draws a list's image sample from its first only)
    ours = pipe(generator=gens(), output_type="latent", **kw)
    ref = test_controlnet_flux._reference(folders, nets, cls)
    theirs = ref(generator=gens(), output_type="latent", **kw).images
    assert ours.images.shape[0] == n
    assert _rel(ours.images, unpack_latents(theirs, H // 2, W // 2)) <= 1e-5
    assert ours.settings["strength"] == spec["kw"]["strength"] and ours.settings["controlnet"]
    if case in ("img2img-two-nets", "inpaint-window"):  # the decoded images too
        ours_img = np.asarray(pipe(generator=gens(), output_type="np", **kw).images)
        theirs_img = np.asarray(ref(generator=gens(), output_type="np", **kw).images)
        assert np.abs((ours_img * 255).round() - (theirs_img * 255).round()).max() <= 1


def test_flux_window_counts_the_steps_that_run(folders):
    """The keep window is over the shortened schedule: at strength 0.6 of 5 steps (3 run), a start of
    0.34 drops the first two steps that run, which differs from keeping the net at every step and
    from dropping one step."""
    pipe = _load(folders["flux"], folders["cn-a"])
    kw = dict(height=H, width=W, num_inference_steps=5, strength=0.6, image=_image(9), control_image=_image(1),
              output_type="latent", guidance_scale=3.5)  # fmt: skip
    runs = {s: pipe("a house", generator=_gen(2), control_guidance_start=s, **kw).images for s in (0.0, 0.3, 0.34, 0.6)}
    assert not torch.equal(runs[0.0], runs[0.3]) and not torch.equal(runs[0.3], runs[0.34])
    assert torch.equal(runs[0.34], runs[0.6])  # 0.34 and 0.6 both leave only the last of the 3 steps


def test_flux_seeds_and_scale_zero(folders):
    """seed= gives each image its own generator (control sample, image sample, noise); an image
    depends on its seed alone. A scale of 0 runs no net: it equals the window that drops every step."""
    pipe = _load(folders["flux"], folders["cn-a"])
    kw = dict(height=H, width=W, num_inference_steps=3, image=_image(9).resize((W, H)), control_image=_image(1),
              mask_image=_mask(), output_type="latent", strength=0.9)  # fmt: skip
    two = pipe("a house", seed=[4, 8], num_images_per_prompt=2, **kw)
    one = pipe("a house", seed=8, **kw)
    assert two.seeds == [4, 8]
    torch.testing.assert_close(two.images[1:], one.images, rtol=1e-5, atol=1e-6)
    zero = pipe("a house", seed=8, controlnet_conditioning_scale=0.0, **kw).images
    late = pipe("a house", seed=8, control_guidance_start=0.99, **kw).images  # no step reaches 0.99
    assert torch.equal(zero, late) and not torch.equal(zero, one.images)


def test_flux_padding_mask_crop(folders):
    """The init image and mask are cropped, the control image is not (resized whole, as diffusers);
    fastflow pastes the result back into the image (diffusers' FluxControlNetInpaintPipeline returns
    the crop's image: compared after diffusers' own apply_overlay)."""
    pipe = _load(folders["flux"], folders["cn-a"])
    image, mask = _image(9, 48, 80).resize((80, 48)), _mask(48, 80, box=(0.5, 0.1, 0.7, 0.4))
    txt, y = pipe.text_encoder(["a house"])
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, num_inference_steps=4, guidance_scale=3.5, height=H,
              width=W, image=image, mask_image=mask, strength=0.8, padding_mask_crop=4,
              control_image=_image(1))  # fmt: skip
    ours = pipe(generator=_gen(1), **kw).images[0]
    theirs = test_controlnet_flux._reference(folders, ("cn-a",), FluxControlNetInpaintPipeline)(
        generator=_gen(1), **kw
    ).images[0]
    processor = VaeImageProcessor(vae_scale_factor=2)
    crop = processor.get_crop_region(mask, W, H, pad=4)
    theirs = processor.apply_overlay(mask, image, theirs, crop)
    assert ours.size == image.size
    a, b = np.asarray(ours).astype(int), np.asarray(theirs).astype(int)
    assert np.abs(a - b).max() <= 1


def test_flux_bad_requests_are_typed_errors_before_work(folders, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")

    pipe = _load(folders["flux"], folders["cn-a"])
    monkeypatch.setattr(pipe, "prepare_text", no_work)
    kw = dict(height=H, width=W, num_inference_steps=2, image=_image(9))
    with pytest.raises(InputError, match="output size"):  # a tensor control image is not resized
        pipe("a cat", control_image=torch.rand(3, H, W + 4), **kw)
    with pytest.raises(InputError, match="strength must be a number in"):
        pipe("a cat", control_image=_image(1), mask_image=_mask(), strength=0.0, **kw)
    with pytest.raises(InputError, match="mask_image needs image"):
        pipe("a cat", control_image=_image(1), mask_image=_mask(), height=H, width=W)
    with pytest.raises(InputError, match="pass control_image"):
        pipe("a cat", **kw)


# SDXL: StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetInpaintPipeline (4- and
# 9-channel UNets)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """test_controlnet.py's tiny SDXL folder and ControlNets, and that folder with a 9-channel
    inpainting UNet (its ControlNets read the 4 latent channels, as diffusers feeds them)."""
    root = tmp_path_factory.mktemp("sdxl-cn")
    out = {v: tiny_pipeline_folder(root / v, v) for v in ("sdxl-tiny", "sd3.5-tiny-medium")}
    test_controlnet.sdxl_controlnet(out["sdxl-tiny"], 10).save_pretrained(root / "cn-sdxl-a")
    net = test_controlnet.sdxl_controlnet(out["sdxl-tiny"], 11, controlnet_conditioning_channel_order="bgr")
    net.save_pretrained(root / "cn-sdxl-b")
    test_controlnet.sd3_controlnet(out["sd3.5-tiny-medium"], 12).save_pretrained(root / "cn-sd3-a")
    out.update({k: root / k for k in ("cn-sdxl-a", "cn-sdxl-b", "cn-sd3-a")})
    nine = tmp_path_factory.mktemp("sdxl-cn-inpaint") / "sdxl-tiny-inpainting"
    shutil.copytree(out["sdxl-tiny"], nine)
    shutil.rmtree(nine / "unet")
    tiny_diffusers_unet("sdxl-tiny", seed=7, in_channels=9, out_channels=4).save_pretrained(nine / "unet")
    return {**out, "sdxl-9": nine}


SH, SW = test_controlnet.H, test_controlnet.W

SDXL_CASES = {
    # 6 steps at strength 0.75 run 4 ("leading" spacing): the window 0.3 .. 0.8 keeps steps 2 and 3 of those
    "4ch-window": dict(
        unet="sdxl-tiny",
        nets=("cn-sdxl-a",),
        kw=dict(strength=0.75, control_guidance_start=0.3, control_guidance_end=0.8, controlnet_conditioning_scale=1.2),
    ),  # fmt: skip
    "4ch-ancestral-two-nets": dict(
        unet="sdxl-tiny",
        nets=("cn-sdxl-a", "cn-sdxl-b"),
        sampler="euler_ancestral",
        kw=dict(controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.25]),
    ),  # fmt: skip
    "9ch-full-strength": dict(unet="sdxl-9", nets=("cn-sdxl-a",), kw=dict(strength=1.0, control_guidance_end=0.6)),
    "9ch-strength": dict(unet="sdxl-9", nets=("cn-sdxl-b",), kw=dict(strength=0.6)),
}


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_inpaint_equals_diffusers(sdxl, case):
    spec = SDXL_CASES[case]
    nets = [sdxl[k] for k in spec["nets"]]
    pipe = test_controlnet._load(sdxl[spec["unet"]], nets if len(nets) > 1 else nets[0])
    ref = test_controlnet.diffusers_sdxl(
        sdxl[spec["unet"]], nets, spec.get("sampler") == "euler_ancestral", StableDiffusionXLControlNetInpaintPipeline
    )
    controls = [test_controlnet._image(i, SH, SW) for i in range(len(nets))]
    kw = dict(height=SH, width=SW, num_inference_steps=6, guidance_scale=5.0, image=_image(9, SH, SW),
              mask_image=_mask(SH + 5, SW + 3), control_image=controls if len(nets) > 1 else controls[0],
              **spec["kw"])  # fmt: skip
    prompts = ["a handwritten seven", "the number nine"]
    sampler = spec.get("sampler", "euler")
    ours = pipe(prompts, generator=_gen(3), sampler=sampler, output_type="latent", **kw)
    theirs = ref(prompts, generator=_gen(3), output_type="latent", **kw).images
    assert _rel(ours.images, theirs) <= 1e-5
    assert ours.settings["inpaint"] and ours.settings["controlnet"]
    ours_img = pipe(prompts, generator=_gen(3), sampler=sampler, output_type="np", **kw).images
    theirs_img = ref(prompts, generator=_gen(3), output_type="np", **kw).images
    assert np.abs((np.asarray(ours_img) * 255).round() - (np.asarray(theirs_img) * 255).round()).max() <= 1


# diffusers' SDXL ControlNet img2img pipeline defaults controlnet_conditioning_scale to 0.8 (its other
# ControlNet pipelines, and fastflow everywhere, to 1.0): the cases give it
SDXL_IMG2IMG_CASES = {
    # 6 steps at strength 0.75 run 4 of them; the window 0.3 .. 0.8 keeps steps 2 and 3 of those
    "window-generator-list": dict(
        nets=("cn-sdxl-a",),
        gens=True,
        kw=dict(strength=0.75, control_guidance_start=0.3, control_guidance_end=0.8, controlnet_conditioning_scale=1.0),
    ),
    "default-strength-ancestral-two-nets": dict(
        nets=("cn-sdxl-a", "cn-sdxl-b"), sampler="euler_ancestral", kw=dict(controlnet_conditioning_scale=[0.7, 1.2])
    ),
    "full-strength-own-size": dict(
        nets=("cn-sdxl-b",), kw=dict(strength=1.0, controlnet_conditioning_scale=0.8), own_size=True
    ),
    "one-step": dict(nets=("cn-sdxl-a",), kw=dict(strength=0.2, guidance_scale=1.0, controlnet_conditioning_scale=1.0)),
}


@pytest.mark.parametrize("case", list(SDXL_IMG2IMG_CASES))
def test_sdxl_img2img_equals_diffusers(sdxl, case):
    spec = SDXL_IMG2IMG_CASES[case]
    nets = [sdxl[k] for k in spec["nets"]]
    pipe = test_controlnet._load(sdxl["sdxl-tiny"], nets if len(nets) > 1 else nets[0])
    ancestral = spec.get("sampler") == "euler_ancestral"
    ref = test_controlnet.diffusers_sdxl(sdxl["sdxl-tiny"], nets, ancestral, StableDiffusionXLControlNetImg2ImgPipeline)
    controls = [test_controlnet._image(i, SH, SW) for i in range(len(nets))]
    image = _image(9, SH, SW)
    kw = dict(height=SH, width=SW)
    if spec.get("own_size"):  # no height / width: both images at their (equal) own size
        image, controls, kw = image.resize((SW, SH)), [c.resize((SW, SH)) for c in controls], {}
    kw.update({"num_inference_steps": 6, "guidance_scale": 5.0, "image": image, **spec["kw"]})
    control = controls if len(nets) > 1 else controls[0]
    prompts = ["a handwritten seven", "the number nine"]
    gens = (lambda: [_gen(3), _gen(4)]) if spec.get("gens") else (lambda: _gen(3))  # noqa: E731
    sampler = spec.get("sampler", "euler")
    ours = pipe(prompts, control_image=control, generator=gens(), sampler=sampler, output_type="latent", **kw)
    theirs = ref(prompts, control_image=control, generator=gens(), output_type="latent", **kw).images
    assert _rel(ours.images, theirs) <= 1e-5
    assert ours.settings["strength"] == spec["kw"].get("strength", 0.8) and ours.settings["controlnet"]
    ours_img = pipe(prompts, control_image=control, generator=gens(), sampler=sampler, output_type="np", **kw).images
    theirs_img = ref(prompts, control_image=control, generator=gens(), output_type="np", **kw).images
    assert np.abs((np.asarray(ours_img) * 255).round() - (np.asarray(theirs_img) * 255).round()).max() <= 1


def test_sdxl_padding_mask_crop_crops_the_control_image(sdxl):
    """The control image is cropped with the mask's box and fill-resized, as the init image; the
    result is pasted back (diffusers' apply_overlay)."""
    pipe = test_controlnet._load(sdxl["sdxl-tiny"], sdxl["cn-sdxl-a"])
    ref = test_controlnet.diffusers_sdxl(
        sdxl["sdxl-tiny"], [sdxl["cn-sdxl-a"]], cls=StableDiffusionXLControlNetInpaintPipeline
    )
    image, mask = _image(9, 48, 80).resize((80, 48)), _mask(48, 80, box=(0.5, 0.1, 0.7, 0.4))
    control = test_controlnet._image(1, 48, 80).resize((80, 48))
    kw = dict(height=SH, width=SW, num_inference_steps=4, guidance_scale=5.0, image=image, mask_image=mask,
              strength=0.8, padding_mask_crop=4, control_image=control)  # fmt: skip
    ours = pipe("a house", generator=_gen(1), **kw).images[0]
    theirs = ref("a house", generator=_gen(1), **kw).images[0]
    assert ours.size == image.size
    assert np.abs(np.asarray(ours).astype(int) - np.asarray(theirs).astype(int)).max() <= 1
    x1, y1, x2, y2 = masks.crop_region(mask, SW, SH, 4)
    outside = np.asarray(control).copy()
    outside[:, :x1], outside[:, x2:], outside[:y1], outside[y2:] = 0, 255, 0, 255  # changed outside the box only
    same = pipe("a house", generator=_gen(1), **{**kw, "control_image": Image.fromarray(outside)}).images[0]
    assert np.array_equal(np.asarray(same), np.asarray(ours))  # the net sees the crop only


def test_sdxl_bad_requests_are_typed_errors_before_work(sdxl, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")

    pipe = test_controlnet._load(sdxl["sdxl-tiny"], sdxl["cn-sdxl-a"])
    monkeypatch.setattr(pipe, "prepare_text", no_work)
    image, mask, control = _image(9, SH, SW).resize((SW, SH)), _mask(SH, SW), _image(1, SH, SW).resize((SW, SH))
    kw = dict(num_inference_steps=2, image=image, mask_image=mask)
    with pytest.raises(InputError, match="control image of the image's size"):
        pipe("a cat", control_image=control.resize((SW * 2, SH)), **kw)
    with pytest.raises(InputError, match="control image of the image's size"):
        pipe("a cat", control_image=control.resize((SW * 2, SH)), padding_mask_crop=2, height=SH, width=SW, **kw)
    with pytest.raises(InputError, match="not a tensor"):
        pipe("a cat", control_image=torch.rand(3, SH, SW), padding_mask_crop=2, **kw)
    with pytest.raises(InputError, match="not dpmpp_2m"):
        pipe("a cat", control_image=control, image=image, sampler="dpmpp_2m", num_inference_steps=2)
    with pytest.raises(InputError, match="strength must be a number in"):
        pipe("a cat", control_image=control, image=image, strength=0, num_inference_steps=2)
    with pytest.raises(InputError, match="strength needs an input image"):
        pipe("a cat", control_image=control, strength=0.5, num_inference_steps=2)
    with pytest.raises(InputError, match="control image of the image's size"):
        pipe("a cat", control_image=control.resize((SW, SH * 2)), image=image, num_inference_steps=2)
    with pytest.raises(InputError, match="strength"):
        pipe("a cat", control_image=control, strength=1.5, **kw)
    sd3 = test_controlnet._load(sdxl["sd3.5-tiny-medium"], sdxl["cn-sd3-a"])
    monkeypatch.setattr(sd3, "prepare_text", no_work)
    with pytest.raises(InputError, match="image-to-image / inpainting with an SD3 ControlNet"):
        sd3("a cat", control_image=control, num_inference_steps=2, image=image.resize((32, 24)),
            mask_image=mask.resize((32, 24)))  # fmt: skip
    # height / width given, no crop: both images are resized to the output (as diffusers)
    monkeypatch.undo()
    out = pipe("a cat", control_image=control.resize((SW * 2, SH)), height=SH, width=SW, seed=0,
               output_type="latent", **kw)  # fmt: skip
    assert out.images.shape[-2:] == (SH // 2, SW // 2)
