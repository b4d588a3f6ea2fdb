"""Inpainting against diffusers' FluxInpaintPipeline, StableDiffusion3InpaintPipeline and
StableDiffusionXLInpaintPipeline (4-channel UNet and a 9-channel inpainting UNet) on tiny random
pipelines: same folders, image, mask and generator; final latents to 1e-5 relative, images to
1/255; padding_mask_crop's crop and paste-back; the input errors, raised before any work."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxInpaintPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3InpaintPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

import fastflow
from fastflow import errors
from fastflow.models import configs
from fastflow.models.flux import unpack_latents
from fastflow.pipelines import masks

from ..conftest import diffusers_flux_scheduler, diffusers_sdxl_modules, diffusers_sdxl_scheduler, tiny_diffusers_unet
from .test_parity import SD3_W, _modules, _rel, _to_uint8

H, W = 32, 48  # multiples of every tiny model's (FLUX 4, SD3 4 with a 32 px side limit, SDXL 4)


def _image(width=W, height=H, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width=W, height=H, box=(0.25, 0.2, 0.7, 0.8), mode="L"):
    """White (repaint) in the box given as fractions (left, top, right, bottom), black elsewhere."""
    a = np.zeros((height, width), np.uint8)
    x1, y1, x2, y2 = box
    a[int(y1 * height) : int(y2 * height), int(x1 * width) : int(x2 * width)] = 255
    return Image.fromarray(a).convert(mode)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _same(ours, theirs):
    a, b = (np.asarray(x).astype(int) for x in (ours, theirs))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


@pytest.mark.parametrize(
    "variant,guidance,strength,steps,mask_size",
    [("flux-tiny-dev", 3.5, 0.6, 4, (W, H)), ("flux-tiny-schnell", 0.0, 1.0, 3, (2 * W, 2 * H))],
)
def test_flux_inpaint_equals_diffusers(pipeline_folders, load, variant, guidance, strength, steps, mask_size):
    pipe = load(variant)
    txt, y = pipe.text_encoder(["make it a seven"])
    ref = FluxInpaintPipeline(
        scheduler=diffusers_flux_scheduler(dynamic=bool(guidance)),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        **_modules(pipeline_folders[variant], FluxTransformer2DModel),
    )  # fmt: skip
    image, mask = _image(), _mask(*mask_size, mode="RGB")  # a mask of twice the size is resized, as diffusers does
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": steps, "guidance_scale": guidance,
          "image": image, "mask_image": mask, "strength": strength}  # fmt: skip
    ours = pipe(generator=_gen(3), output_type="latent", **kw)
    theirs = ref(height=H, width=W, generator=_gen(3), output_type="latent", **kw).images
    assert ours.settings["inpaint"] and ours.settings["strength"] == strength
    assert _rel(ours.images, unpack_latents(theirs, H // 2, W // 2)) <= 1e-5
    _same(
        _to_uint8(pipe(generator=_gen(3), output_type="np", **kw).images),
        _to_uint8(ref(height=H, width=W, generator=_gen(3), output_type="np", **kw).images),
    )


def test_flux_padding_mask_crop_equals_diffusers(pipeline_folders, load):
    pipe = load("flux-tiny-dev")
    txt, y = pipe.text_encoder(["make it a seven"])
    ref = FluxInpaintPipeline(
        scheduler=diffusers_flux_scheduler(), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, **_modules(pipeline_folders["flux-tiny-dev"], FluxTransformer2DModel),
    )  # fmt: skip
    image, mask = _image(80, 48, seed=2), _mask(80, 48, box=(0.5, 0.1, 0.7, 0.4))
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": 4, "guidance_scale": 3.5,
          "image": image, "mask_image": mask, "strength": 0.8, "padding_mask_crop": 4,
          "height": H, "width": W}  # fmt: skip
    ours = pipe(generator=_gen(1), **kw).images
    theirs = ref(generator=_gen(1), **kw).images
    assert ours[0].size == image.size  # pasted back into the caller's image
    _same(ours[0], theirs[0])
    kept = np.asarray(mask) == 0
    assert (np.asarray(ours[0])[kept] == np.asarray(image)[kept]).all()  # unmasked pixels are the input's
    out = pipe(generator=_gen(1), return_dict=False, **kw)
    assert isinstance(out, tuple) and out[0][0].size == image.size


def test_crop_region_equals_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    cases = [(80, 48, (0.5, 0.1, 0.7, 0.4), 4, (48, 32)), (64, 64, (0.0, 0.6, 0.1, 1.0), 30, (32, 48)),
             (64, 40, (0.9, 0.0, 1.0, 1.0), 0, (64, 16)), (40, 40, (0.4, 0.4, 0.5, 0.5), 2, (40, 40))]  # fmt: skip
    for w, h, box, pad, size in cases:
        mask = _mask(w, h, box=box)
        assert masks.crop_region(mask, *size, pad) == VaeImageProcessor.get_crop_region(mask, *size, pad=pad)


def test_sd3_inpaint_equals_diffusers(pipeline_folders, load):
    pipe = load("sd3.5-tiny-medium")
    ctx, pooled = pipe.text_encoder(["make it a seven"])
    neg_ctx, neg_pooled = pipe.text_encoder([""])
    none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    ref = StableDiffusion3InpaintPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **none,
        **_modules(pipeline_folders["sd3.5-tiny-medium"], SD3Transformer2DModel),
    )
    image, mask = _image(SD3_W, H, seed=1), _mask(SD3_W, H)
    kw = {
        "prompt_embeds": ctx, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg_ctx,
        "negative_pooled_prompt_embeds": neg_pooled, "num_inference_steps": 8, "guidance_scale": 4.5,
        "image": image, "mask_image": mask, "strength": 0.7,
    }  # fmt: skip
    ours = pipe(generator=_gen(5), sampler="euler", output_type="latent", **kw).images
    theirs = ref(height=H, width=SD3_W, generator=_gen(5), output_type="latent", **kw).images
    assert _rel(ours, theirs) <= 1e-5
    # diffusers' SD3 inpaint decodes latents / scaling_factor without adding the VAE's shift_factor
    # (its img2img and text-to-image pipelines add it): the reference image is its latents decoded
    # as those pipelines decode them
    vae = ref.vae
    assert vae.config.shift_factor != 0
    pixels = vae.decode(theirs / vae.config.scaling_factor + vae.config.shift_factor).sample
    _same(
        _to_uint8(pipe(generator=_gen(5), sampler="euler", output_type="np", **kw).images),
        _to_uint8(ref.image_processor.postprocess(pixels.detach(), output_type="np")),
    )


@pytest.fixture(scope="module")
def inpainting_unet_folder(pipeline_folders, tmp_path_factory):
    """The tiny SDXL folder with a 9-channel UNet (noise + mask + masked-image latents)."""
    root = tmp_path_factory.mktemp("sdxl-inpaint") / "sdxl-tiny-inpainting"
    shutil.copytree(pipeline_folders["sdxl-tiny"], root)
    shutil.rmtree(root / "unet")
    tiny_diffusers_unet("sdxl-tiny", seed=7, in_channels=9, out_channels=4).save_pretrained(root / "unet")
    return root


def diffusers_sdxl_inpaint(folder, ancestral=False):
    pipe = StableDiffusionXLInpaintPipeline(
        **diffusers_sdxl_modules(folder),
        scheduler=diffusers_sdxl_scheduler(configs.from_name("sdxl-tiny"), ancestral),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "unet,strength,steps,sampler",
    [("4", 0.75, 6, "euler"), ("4", None, 5, "euler_ancestral"), ("9", 1.0, 5, "euler"), ("9", 0.6, 6, "euler")],
)
def test_sdxl_inpaint_equals_diffusers(pipeline_folders, inpainting_unet_folder, unet, strength, steps, sampler):
    folder = pipeline_folders["sdxl-tiny"] if unet == "4" else inpainting_unet_folder
    pipe = fastflow.load(folder, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.in_channels == int(unet)
    ref = diffusers_sdxl_inpaint(folder, ancestral=sampler == "euler_ancestral")
    image, mask = _image(seed=4), _mask(box=(0.1, 0.3, 0.6, 0.9))
    kw = {"prompt": "a handwritten seven", "num_inference_steps": steps, "guidance_scale": 5.0, "image": image,
          "mask_image": mask, **({} if strength is None else {"strength": strength})}  # fmt: skip
    ours = pipe(generator=_gen(2), sampler=sampler, output_type="latent", **kw)
    theirs = ref(height=H, width=W, generator=_gen(2), output_type="latent", **kw).images
    assert ours.settings["strength"] == (0.9999 if strength is None else strength)
    assert _rel(ours.images, theirs) <= 1e-5
    _same(
        _to_uint8(pipe(generator=_gen(2), sampler=sampler, output_type="np", **kw).images),
        _to_uint8(ref(height=H, width=W, generator=_gen(2), output_type="np", **kw).images),
    )


def test_sdxl_inpainting_unet_needs_a_mask(inpainting_unet_folder, pipeline_folders):
    pipe = fastflow.load(inpainting_unet_folder, dtype=torch.float32, device="cpu")
    with pytest.raises(errors.InputError, match="inpainting UNet"):
        pipe("a seven", num_inference_steps=2)
    base = fastflow.load(pipeline_folders["sdxl-tiny"], dtype=torch.float32, device="cpu")
    with pytest.raises(errors.InputError, match="strength needs an input image"):
        base("a seven", strength=0.5, num_inference_steps=2)
    with pytest.raises(errors.InputError, match="image-to-image runs the euler"):
        base("a seven", image=_image(), sampler="dpmpp_2m", num_inference_steps=2)  # image-to-image without a mask
    with pytest.raises(errors.InputError, match="dpmpp_2m"):
        base("a seven", image=_image(), mask_image=_mask(), sampler="dpmpp_2m", num_inference_steps=2)
    with pytest.raises(errors.InputError, match="runs no step"):
        base("a seven", image=_image(), mask_image=_mask(), strength=0.1, num_inference_steps=5)


def test_blending_keeps_the_unmasked_region(load):
    """After the last step the known region is the image latent itself (sigma 0), whatever the model."""
    pipe = load("flux-tiny-schnell")
    image, mask = _image(), _mask()
    out = pipe("a seven", image=image, mask_image=mask, strength=1.0, seed=3, num_inference_steps=3,
               output_type="latent")  # fmt: skip
    small = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None],
                                            size=out.images.shape[-2:])  # fmt: skip
    r = type("R", (), {"image": image, "mask_image": mask, "padding_mask_crop": None})
    pixels, _ = masks.pixels_and_mask(r, H, W)
    gen = torch.Generator().manual_seed(3)
    mean, std = pipe.vae.posterior(pixels)
    latent = pipe.vae.scale(mean + std * torch.randn(mean.shape, generator=gen))
    keep = (small < 0.5).expand_as(out.images)
    torch.testing.assert_close(out.images[keep], latent.expand_as(out.images)[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(out.images[~keep], latent.expand_as(out.images)[~keep], atol=1e-2)


BAD = [
    (dict(mask_image=_mask()), "needs image="),
    (dict(padding_mask_crop=4), "needs mask_image="),
    (dict(image=_image(), mask_image=42), "mask_image must be"),
    (dict(image=_image(), mask_image=np.zeros((H, W), np.float32)), "uint8 or bool"),
    (dict(image=_image(), mask_image="/nonexistent/mask.png"), "not found"),
    (dict(image=_image(), mask_image=_mask(W, W)), "aspect ratio"),
    (dict(image=_image(), mask_image=_mask(), strength=0.0), "strength"),
    (dict(image=_image(), mask_image=_mask(), strength=1.5), "strength"),
    (dict(image=np.asarray(_image()), mask_image=_mask(), padding_mask_crop=4), "PIL image"),
    (dict(image=_image(), mask_image=np.asarray(_mask()), padding_mask_crop=4), "PIL image"),
    (dict(image=_image(), mask_image=_mask(), padding_mask_crop=-1), "padding_mask_crop"),
    (dict(image=_image(), mask_image=_mask(), padding_mask_crop=4, output_type="np"), "output_type"),
    (dict(image=_image(), mask_image=_mask(2 * W, 2 * H), padding_mask_crop=4), "mask of the image's size"),
    (dict(image=_image(), mask_image=_mask(box=(0, 0, 0, 0)), padding_mask_crop=4), "white"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_inpainting_input_is_refused_before_work(load, kwargs, message):
    pipe = load("flux-tiny-schnell")
    calls = []
    pipe.vae.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(errors.InputError, match=message):
        pipe("a seven", num_inference_steps=2, **kwargs)
    assert calls == []


def test_kontext_does_not_inpaint_and_masks_load_from_files(load, tmp_path):
    with pytest.raises(errors.InputError, match="Kontext"):
        load("flux-tiny-kontext")("make it red", image=_image(), mask_image=_mask(), num_inference_steps=2)
    path = tmp_path / "mask.png"
    _mask().save(path)
    pipe = load("flux-tiny-schnell")
    a = pipe("a seven", image=_image(), mask_image=path, seed=1, num_inference_steps=2, output_type="latent").images
    b = pipe("a seven", image=_image(), mask_image=np.asarray(_mask()) > 0, seed=1, num_inference_steps=2,
             output_type="latent").images  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cli_mask_inpaints(capsys, tmp_path):
    """fastflow generate --image IMG --mask MASK: inpainting (the settings in the PNG say so)."""
    import json

    from fastflow.cli import main

    fast = ["--steps", "2", "--no-progress", "--device", "cpu"]
    src, mask = tmp_path / "src.png", tmp_path / "mask.png"
    assert main(["generate", "a handwritten seven", "-o", str(src), "--seed", "1", *fast]) == 0
    right = np.zeros((16, 16), np.uint8)
    right[:, 8:] = 255
    Image.fromarray(right).save(mask)
    argv = ["generate", "a handwritten seven", "-o", str(tmp_path / "b.png"), "--image", str(src), "--mask",
            str(mask), "--strength", "1", "--seed", "2", *fast]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    with Image.open(tmp_path / "b.png") as im:
        settings = json.loads(im.text["settings"])
        out = np.asarray(im.convert("RGB"))
    assert settings["inpaint"] is True and settings["strength"] == 1
    with Image.open(src) as im:
        assert np.abs(out[:, :6].astype(int) - np.asarray(im.convert("RGB"))[:, :6]).max() <= 24  # kept half
    capsys.readouterr()
    for argv, message in [(["--mask", str(mask)], "--mask needs --image"),
                          (["--image", str(src), "--mask", str(tmp_path / "nope.png")], "no such file")]:  # fmt: skip
        assert main(["generate", "a seven", *fast, *argv]) == 2
        assert message in capsys.readouterr().err


def test_inpaint_digits_bench_runs(digits):
    """bench/inpaint_digits.py on one digit per class (the measured accuracy is in its docstring)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "bench" / "inpaint_digits.py"
    spec = importlib.util.spec_from_file_location("inpaint_digits", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(digits, 1, num_inference_steps=6)
    assert result["digits"] == 10 and 0 <= result["inpainted"] <= 1
    assert result["inpainted"] >= 0.5  # a digit completed from half of it is mostly recognised
    assert bench.half_mask(16, "top")[:8].all() and not bench.half_mask(16, "top")[8:].any()


@pytest.mark.parametrize("variant", ["flux-tiny-schnell", "sd3.5-tiny-medium", "sdxl-tiny"])
def test_inpainting_seeds_are_per_image(load, variant):
    """A batch's image i equals the image made alone from seed i (posterior, noise and masked-image
    draws all from the image's own seed)."""
    pipe = load(variant)
    w = SD3_W if variant.startswith("sd3") else W
    kw = {"image": _image(w), "mask_image": _mask(w), "num_inference_steps": 3, "output_type": "latent"}
    batch = pipe("a handwritten seven", seed=10, num_images_per_prompt=2, **kw)
    alone = pipe("a handwritten seven", seed=11, **kw).images
    assert batch.seeds == [10, 11] and batch.settings["inpaint"]
    torch.testing.assert_close(alone[0], batch.images[1], rtol=1e-4, atol=1e-4)  # batched convs round apart
    with pytest.raises(errors.InputError, match="needs image="):
        pipe("a seven", mask_image=_mask(w), num_inference_steps=2)


def test_sdxl_inpainting_single_file_loads_like_the_folder(inpainting_unet_folder, tmp_path):
    """Stability's single-file layout of an inpainting UNet (input_blocks.0.0 takes 9 channels): the
    registered config it widens is found from the shapes (or named by variant=), same latents."""
    from safetensors.torch import save_file

    from .test_sdxl import _openclip

    folder = inpainting_unet_folder
    ref = fastflow.load(folder, dtype=torch.float32)
    te = ref.text_encoder
    state = {f"model.diffusion_model.{k}": v for k, v in ref.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in ref.vae.state_dict().items()}
    state |= {f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in te.clip_l.model.state_dict().items()}
    state |= {f"conditioner.embedders.1.model.{k}": v for k, v in _openclip(te.clip_g.model.state_dict()).items()}
    path = tmp_path / "sd_xl_inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    text = {"clip_l": (folder / "text_encoder", folder / "tokenizer"),
            "clip_g": (folder / "text_encoder_2", folder / "tokenizer_2")}  # fmt: skip
    kw = dict(image=_image(), mask_image=_mask(), num_inference_steps=3, seed=4, output_type="latent")
    expected = ref("a handwritten seven", **kw).images
    pipe = fastflow.load(path, dtype=torch.float32, text_encoders=text, variant="sdxl-tiny")
    assert pipe.config.in_channels == 9 and pipe.config.name == "sdxl-tiny"
    torch.testing.assert_close(pipe("a handwritten seven", **kw).images, expected, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="variant="):  # base or Turbo: as for a 4-channel file
        assert fastflow.load(path, dtype=torch.float32, text_encoders=text).config.in_channels == 9
    with pytest.raises(errors.VariantMismatchError):
        fastflow.load(path, dtype=torch.float32, text_encoders=text, variant="sdxl-base")  # other widths
