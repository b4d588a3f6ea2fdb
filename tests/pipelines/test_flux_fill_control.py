"""FLUX.1 Fill and FLUX.1 Canny / Depth against diffusers' FluxFillPipeline and FluxControlPipeline
on tiny random folders (same transformer, VAE, embeddings and generator), their recognition from
the img_in width, their typed errors, and canny edges."""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxTransformer2DModel
from PIL import Image

import fastflow
from fastflow import errors
from fastflow.models.configs import from_name
from fastflow.models.flux import unpack_latents
from fastflow.pipelines.flux_conditioning import pack_mask

from ..conftest import diffusers_flux_scheduler, tiny_diffusers_flux, tiny_pipeline_folder
from .test_parity import _modules, _rel, _to_uint8

H, W = 24, 40


def _folder(root, variant: str, pipeline_class: str, name_or_path: str | None = None):
    folder = tiny_pipeline_folder(root, "flux-tiny-dev")
    tiny_diffusers_flux(variant).save_pretrained(folder / "transformer")
    if name_or_path is not None:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, "_name_or_path": name_or_path}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditioned")
    return {
        "fill": _folder(root / "fill", "flux-tiny-fill", "FluxFillPipeline"),
        "canny": _folder(
            root / "canny", "flux-tiny-canny", "FluxControlPipeline", "black-forest-labs/FLUX.1-Canny-dev"
        ),
        "depth": _folder(
            root / "depth", "flux-tiny-depth", "FluxControlPipeline", "black-forest-labs/FLUX.1-Depth-dev"
        ),
    }


def _load(folder):
    pipe = fastflow.load(folder, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(width=W, height=H, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width=W, height=H):
    mask = np.zeros((height, width), np.uint8)
    mask[4:17, 10:30] = 255  # not on the 2x2 cells' grid, so the packing's order matters
    mask[18:, :] = np.arange(width, dtype=np.uint8)[None] * 3 + 70  # grays about 127.5: the binarization
    return Image.fromarray(mask)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference(cls, folder):
    return cls(
        scheduler=diffusers_flux_scheduler(dynamic=True),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        **_modules(folder, FluxTransformer2DModel),
    )  # fmt: skip


def test_variants_are_recognised_from_the_img_in_width(folders):
    assert _load(folders["fill"]).config.name == "flux-tiny-fill"
    assert _load(folders["canny"]).config.name == "flux-tiny-canny"
    depth = _load(folders["depth"])
    assert depth.config.name == "flux-tiny-depth" and depth.defaults["guidance"] == 10.0
    for name, kind in (("flux-fill-dev", "fill"), ("flux-canny-dev", "control"), ("flux-depth-dev", "control")):
        assert from_name(name).conditioning == kind and from_name(name).in_channels == (384 if kind == "fill" else 128)
    assert from_name("flux-dev").conditioning is None and from_name("flux-fill-dev").sampling.guidance == 30.0


def test_an_unnamed_control_folder_loads_as_canny_with_a_warning(tmp_path):
    folder = _folder(tmp_path, "flux-tiny-canny", "FluxControlPipeline")
    with pytest.warns(UserWarning, match="Canny or Depth"):
        assert _load(folder).config.name == "flux-tiny-canny"


@pytest.mark.parametrize("strength,steps,n,size", [(1.0, 3, 1, None), (0.7, 4, 2, (32, 48))])
def test_fill_equals_diffusers(folders, strength, steps, n, size):
    """Same generator; the second case also resizes the image and the mask (LANCZOS) to 32 x 48."""
    pipe = _load(folders["fill"])
    txt, y = pipe.text_encoder(["fill the hole"])
    ref = _reference(FluxFillPipeline, folders["fill"])
    image, mask = _image(), _mask()
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": steps, "guidance_scale": 30.0,
          "image": image, "mask_image": mask, "strength": strength, "num_images_per_prompt": n}  # fmt: skip
    height, width = size or (H, W)
    ours = pipe(
        generator=_gen(3), output_type="latent", **(kw if size is None else dict(kw, height=height, width=width))
    )
    theirs = ref(height=height, width=width, generator=_gen(3), output_type="latent", **kw)
    assert (ours.settings["height"], ours.settings["width"]) == (height, width)  # default: the image's size
    assert _rel(ours.images, unpack_latents(theirs.images, height // 2, width // 2)) <= 1e-5
    ours_img = _to_uint8(pipe(generator=_gen(3), output_type="np", height=height, width=width, **kw).images)
    theirs_img = _to_uint8(ref(height=height, width=width, generator=_gen(3), output_type="np", **kw).images)
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


def test_fill_defaults_to_guidance_30_and_strength_1(folders):
    pipe = _load(folders["fill"])
    out = pipe("x", image=_image(), mask_image=_mask(), num_inference_steps=1, seed=0, output_type="latent")
    assert out.settings["guidance_scale"] == 30.0 and out.settings["strength"] == 1.0


@pytest.mark.parametrize("n", [1, 2])
def test_control_equals_diffusers(folders, n):
    pipe = _load(folders["canny"])
    txt, y = pipe.text_encoder(["a house"])
    ref = _reference(FluxControlPipeline, folders["canny"])
    control = fastflow.canny(_image(seed=1), 100, 200)
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": 3, "guidance_scale": 30.0,
          "control_image": control, "num_images_per_prompt": n}  # fmt: skip
    ours = pipe(generator=_gen(5), output_type="latent", **kw)
    theirs = ref(height=H, width=W, generator=_gen(5), output_type="latent", **kw)
    assert (ours.settings["height"], ours.settings["width"]) == (H, W)  # the control image's size
    assert _rel(ours.images, unpack_latents(theirs.images, H // 2, W // 2)) <= 1e-5
    ours_img = _to_uint8(pipe(generator=_gen(5), output_type="np", **kw).images)
    theirs_img = _to_uint8(ref(height=H, width=W, generator=_gen(5), output_type="np", **kw).images)
    assert np.abs(ours_img.astype(int) - theirs_img.astype(int)).max() <= 1


def test_the_condition_changes_the_output(folders):
    """The control image and the mask reach the transformer (a dropped condition would pass parity
    only if diffusers dropped it too)."""
    pipe = _load(folders["canny"])
    a = pipe("x", control_image=_image(seed=1), num_inference_steps=2, seed=0, output_type="latent").images
    b = pipe("x", control_image=_image(seed=2), num_inference_steps=2, seed=0, output_type="latent").images
    assert (a - b).abs().max() > 1e-3
    fill = _load(folders["fill"])
    full = Image.fromarray(np.full((H, W), 255, np.uint8))
    a = fill("x", image=_image(), mask_image=_mask(), num_inference_steps=2, seed=0, output_type="latent").images
    b = fill("x", image=_image(), mask_image=full, num_inference_steps=2, seed=0, output_type="latent").images
    assert (a - b).abs().max() > 1e-3


def test_seeds_are_per_image(folders):
    pipe = _load(folders["canny"])
    kw = {"control_image": _image(seed=1), "num_inference_steps": 2, "output_type": "latent"}
    batch = pipe("x", seed=7, num_images_per_prompt=2, **kw).images
    alone = pipe("x", seed=8, **kw).images
    assert _rel(batch[1:], alone) <= 1e-5


def test_pack_mask_cells_become_channels():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 0, 1] = 1.0  # latent pixel (0, 0), cell position (0, 1) -> channel 1 of that pixel
    packed = pack_mask(mask, 2)  # [1, 1 token, 4 cells x 2x2 latent pixels = 16]
    assert packed.shape == (1, 1, 16) and packed[0, 0].nonzero().flatten().tolist() == [1 * 4 + 0]


def test_missing_or_foreign_inputs_are_typed_errors(folders, load):
    fill, canny, dev = _load(folders["fill"]), _load(folders["canny"]), load("flux-tiny-dev")
    kw = {"num_inference_steps": 1, "seed": 0, "output_type": "latent"}
    with pytest.raises(errors.InputError, match="mask_image"):
        fill("x", image=_image(), **kw)
    with pytest.raises(errors.InputError, match="image= and mask_image="):
        fill("x", mask_image=_mask(), **kw)
    with pytest.raises(errors.InputError, match="not control_image"):
        fill("x", image=_image(), mask_image=_mask(), control_image=_image(), **kw)
    with pytest.raises(errors.InputError, match="of the image's size"):
        fill("x", image=_image(), mask_image=_mask(W + 4, H), **kw)
    with pytest.raises(errors.InputError, match="mode"):  # masks.load_mask's refusal (PIL cannot make it gray)
        fill("x", image=_image(), mask_image=Image.new("La", (W, H)), **kw)
    with pytest.raises(errors.InputError, match="needs control_image"):
        canny("x", **kw)
    with pytest.raises(errors.InputError, match="control_image= only"):
        canny("x", control_image=_image(), image=_image(), **kw)
    with pytest.raises(errors.InputError, match="takes no control_image"):
        dev("x", control_image=_image(), **kw)
    with pytest.raises(errors.InputError, match="mask_image needs image="):  # dev: inpainting (pipelines/masks.py)
        dev("x", mask_image=_mask(), **kw)
    with pytest.raises(errors.InputError, match="padding_mask_crop"):
        fill("x", image=_image(), mask_image=_mask(), padding_mask_crop=4, **kw)


def test_canny_finds_the_edges_of_a_square():
    a = np.zeros((32, 32, 3), np.uint8)
    a[8:24, 8:24] = 255
    a[12:20, 12:20] = 128
    edges = np.asarray(fastflow.canny(Image.fromarray(a)))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) <= {0, 255}
    e = edges[..., 0] > 0
    # the outer square's sides (OpenCV's tie rule keeps the first of two equal pixels: rows 7 and 23)
    assert e[7, 9:23].all() and e[23, 9:23].all() and e[9:23, 7].all() and e[9:23, 23].all()
    assert e[11, 13:19].all()  # the inner step (255 -> 128) is above the high threshold too
    assert not e[:5].any() and not e[14:18, 14:18].any()  # flat regions have no edges
    weak = np.asarray(fastflow.canny(Image.fromarray(a), low=100, high=2000))[..., 0]
    assert not weak.any()  # nothing is above high: hysteresis starts nowhere
    with pytest.raises(errors.InputError):
        fastflow.canny(Image.fromarray(a), low=200, high=100)


def test_canny_hysteresis_follows_weak_pixels_from_a_strong_one():
    a = np.zeros((16, 40), np.uint8)
    a[8:, :] = np.linspace(60, 20, 40).astype(np.uint8)[None]  # a step fading from strong to weak
    edges = np.asarray(fastflow.canny(a[..., None].repeat(3, -1), low=80, high=200))[..., 0] > 0
    strong = np.asarray(fastflow.canny(a[..., None].repeat(3, -1), low=200, high=200))[..., 0] > 0
    assert strong.any() and edges.sum() > strong.sum()  # the weak part joins through the strong start
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        isolated = a.copy()
        isolated[8:, :] = 20  # weak everywhere, nothing strong
        assert not (np.asarray(fastflow.canny(isolated[..., None].repeat(3, -1), low=80, high=200)) > 0).any()


def test_cli_control_image(folders, tmp_path):
    """``fastflow generate --control-image IMG`` (a subprocess, as a user runs it): the output takes
    the control image's size; a missing file is a one-line usage error."""
    import subprocess
    import sys

    control = tmp_path / "edges.png"
    fastflow.canny(_image(48, 32, seed=4)).save(control)
    out = tmp_path / "house.png"
    args = [sys.executable, "-m", "fastflow", "generate", "a house", "-o", out, "--model", folders["canny"],
            "--steps", "1", "--seed", "1", "--no-progress", "--control-image"]  # fmt: skip
    done = subprocess.run([*map(str, args), str(control)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with Image.open(out) as image:
        assert image.size[0] / image.size[1] == 48 / 32
    bad = subprocess.run([*map(str, args), str(tmp_path / "none.png")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--control-image" in bad.stderr.strip().splitlines()[-1]


def test_official_single_files_are_recognised(folders, tmp_path):
    """BFL single files (official key names): Fill from its img_in width alone; Canny and Depth from
    the file's name (flux1-canny-dev / flux1-depth-dev), Canny with a warning when nothing names it."""
    from safetensors.torch import save_file

    states = {}
    for kind in ("fill", "canny"):
        model = fastflow.load_transformer(folders[kind] / "transformer", dtype=torch.float32)
        states[kind] = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "img_in.weight" in states["fill"] and states["fill"]["img_in.weight"].shape[1] == 144
    cases = [("fill", "model.safetensors", "flux-tiny-fill"),
             ("canny", "flux1-canny-dev.safetensors", "flux-tiny-canny"),
             ("canny", "flux1-depth-dev.safetensors", "flux-tiny-depth")]  # fmt: skip
    for kind, file, expected in cases:
        save_file(states[kind], str(tmp_path / file))
        assert fastflow.load_transformer(tmp_path / file, dtype=torch.float32).config.name == expected
    save_file(states["canny"], str(tmp_path / "unnamed.safetensors"))
    with pytest.warns(UserWarning, match="Canny or Depth"):
        assert fastflow.load_transformer(tmp_path / "unnamed.safetensors").config.name == "flux-tiny-canny"
    named = tmp_path / "meta.safetensors"
    save_file(states["canny"], str(named), metadata={"modelspec.title": "FLUX.1 Depth [dev]"})
    assert fastflow.load_transformer(named).config.name == "flux-tiny-depth"


# cv2.Canny(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), 100, 200) of the image below, recorded once with
# opencv-python-headless 5.1.0 (OpenCV is no test dependency)
OPENCV_EDGES = [
    "000010000000000000000000",
    "000111110000011111111100",
    "001100000111000000000100",
    "011000010000111010000011",
    "000000100011000011000100",
    "010001001110011001000100",
    "010010011000100001011000",
    "000010110000111001101001",
    "001101100100100110011001",
    "011001100100010000010101",
    "001010000100110000010010",
    "010000101101100110110001",
    "010011001000001000000001",
    "001000001010001010010111",
]


def test_canny_equals_opencv_on_a_recorded_image():
    y, x = np.mgrid[0:14, 0:24]
    a = np.stack([(x * 23 + y * 7) % 256, (x * y * 5 + 40) % 256, ((x // 4 + y // 3) % 2) * 200 + 20], -1)
    edges = np.asarray(fastflow.canny(a.astype(np.uint8), 100, 200))[..., 0] > 0
    assert ["".join(str(int(v)) for v in row) for row in edges] == OPENCV_EDGES


def test_composes_with_caching_and_true_cfg(folders):
    """The condition rides along the cache runner's embed (fbcache at threshold 0 recomputes every
    step: the same latents) and is repeated over true CFG's two branches."""
    pipe = _load(folders["canny"])
    kw = {"control_image": _image(seed=1), "num_inference_steps": 3, "seed": 2, "output_type": "latent"}
    plain = pipe("x", **kw).images
    cached = pipe("x", cache="fbcache", cache_threshold=0.0, **kw).images
    assert _rel(cached, plain) <= 1e-6
    fill = _load(folders["fill"])
    kw = {"image": _image(), "mask_image": _mask(), "num_inference_steps": 2, "seed": 2, "output_type": "latent"}
    prompt = "a handwritten seven"  # words the tiny tokenizers know
    guided = fill(prompt, true_cfg_scale=2.0, negative_prompt="the digit 3", **kw).images
    assert torch.isfinite(guided).all() and (guided - fill(prompt, **kw).images).abs().max() > 1e-4
