"""Issue 35, FLUX ControlNets: fastflow against diffusers' FluxControlNetPipeline on a tiny random
FLUX.1 dev folder and tiny random FluxControlNetModels built by diffusers (latents to 1e-5, images
to 1/255): one ControlNet (with the keep window, several images per prompt, true CFG), a union
ControlNet with control_mode, two ControlNets (FluxMultiControlNetModel); scale 0 equal to no
ControlNet; caching with the residuals; the typed errors before any work."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
    FluxTransformer2DModel,
)
from PIL import Image

import fastflow
from fastflow.errors import CheckpointError, FamilyMismatchError, InputError
from fastflow.models.flux import unpack_latents

from ..conftest import diffusers_flux_scheduler, tiny_diffusers_flux, tiny_pipeline_folder

H, W = 24, 40  # the tiny VAE halves once: 12 x 20 latents, 6 x 10 tokens


def _randomize(model, seed):
    """Every weight random (the zero-initialised linears too), the QK norm scales around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def flux_controlnet(base, seed, layers=2, single_layers=2, **kw):
    """A FluxControlNetModel of the base transformer's widths (``kw``: other fields)."""
    c = base.config
    args = dict(patch_size=1, in_channels=c.in_channels, num_layers=layers, num_single_layers=single_layers,
                attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
                joint_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
                guidance_embeds=c.guidance_embeds, axes_dims_rope=c.axes_dims_rope)  # fmt: skip
    return _randomize(FluxControlNetModel(**{**args, **kw}), seed)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-cn")
    base = tiny_pipeline_folder(root / "flux", "flux-tiny-dev")
    # 3 double / 3 single blocks for 2-block nets: block i takes residual i // ceil(3 / 2) (0, 0, 1)
    tiny_diffusers_flux("flux-tiny-dev", 0, depth=3, depth_single_blocks=3).save_pretrained(base / "transformer")
    transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
    flux_controlnet(transformer, 11).save_pretrained(root / "cn-a")
    flux_controlnet(transformer, 12, num_mode=4).save_pretrained(root / "cn-union")
    flux_controlnet(transformer, 13, layers=1, single_layers=1).save_pretrained(root / "cn-short")
    flux_controlnet(transformer, 14, joint_attention_dim=32).save_pretrained(root / "cn-narrow")
    out = {k: root / k for k in ("cn-a", "cn-union", "cn-short", "cn-narrow")}
    out["flux"] = base
    return out


def _load(folder, controlnet=None):
    pipe = fastflow.load(folder, dtype=torch.float32, device="cpu", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed, h=H, w=W):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h + 5, w + 3, 3), dtype=np.uint8))  # resized by both


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference(folders, nets, cls=FluxControlNetPipeline):
    """diffusers' FLUX ControlNet pipeline ``cls`` (text-to-image, image-to-image or inpainting)."""
    loaded = [FluxControlNetModel.from_pretrained(folders[k]) for k in nets]
    return cls(
        scheduler=diffusers_flux_scheduler(dynamic=True),
        vae=AutoencoderKL.from_pretrained(folders["flux"] / "vae"),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=FluxTransformer2DModel.from_pretrained(folders["flux"] / "transformer"),
        controlnet=loaded[0] if len(loaded) == 1 else FluxMultiControlNetModel(loaded),
    )  # fmt: skip


CASES = {
    "one": dict(nets=("cn-a",), kw=dict(controlnet_conditioning_scale=0.8)),
    "one-window-two-images": dict(
        nets=("cn-a",),
        kw=dict(controlnet_conditioning_scale=1.3, control_guidance_start=0.2, control_guidance_end=0.7),
        n=2,
    ),
    "one-true-cfg": dict(nets=("cn-a",), kw=dict(controlnet_conditioning_scale=0.9, true_cfg_scale=2.5), neg=True),
    "union": dict(nets=("cn-union",), kw=dict(controlnet_conditioning_scale=0.9, control_mode=2)),
    "two": dict(
        nets=("cn-a", "cn-union"),
        kw=dict(controlnet_conditioning_scale=[0.6, 1.1], control_guidance_end=[0.5, 1.0], control_mode=[None, 1]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers(folders, case):
    spec = CASES[case]
    nets = spec["nets"]
    pipe = _load(folders["flux"], [folders[k] for k in nets] if len(nets) > 1 else folders[nets[0]])
    txt, y = pipe.text_encoder(["a house"])
    images = [_image(i + 1) for i in range(len(nets))]
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, num_inference_steps=4, guidance_scale=3.5, height=H,
              width=W, num_images_per_prompt=spec.get("n", 1), control_image=images if len(nets) > 1 else images[0],
              **spec["kw"])  # fmt: skip
    if spec.get("neg"):
        neg_txt, neg_y = pipe.text_encoder(["blurry"])
        kw.update(negative_prompt_embeds=neg_txt, negative_pooled_prompt_embeds=neg_y)
    ours = pipe(generator=_gen(5), output_type="latent", **kw)
    ref = _reference(folders, nets)
    theirs = ref(generator=_gen(5), output_type="latent", **kw).images
    assert _rel(ours.images, unpack_latents(theirs, H // 2, W // 2)) <= 1e-5
    assert ours.settings["controlnet"]["mode"] == (
        spec["kw"].get("control_mode") if len(nets) > 1 else [spec["kw"].get("control_mode")]
    )
    if case == "two":  # the decoded images too
        ours_img = np.asarray(pipe(generator=_gen(5), output_type="np", **kw).images)
        theirs_img = np.asarray(ref(generator=_gen(5), output_type="np", **kw).images)
        assert np.abs((ours_img * 255).round() - (theirs_img * 255).round()).max() <= 1


def test_scale_zero_is_no_controlnet(folders):
    noise = torch.randn(1, 16, H // 2, W // 2, generator=_gen(0))
    kw = dict(height=H, width=W, num_inference_steps=3, output_type="latent", guidance_scale=3.5, latents=noise)
    plain = _load(folders["flux"])("a cat", generator=_gen(7), **kw).images
    pipe = _load(folders["flux"], folders["cn-a"])
    zero = pipe("a cat", control_image=_image(0), controlnet_conditioning_scale=0.0, generator=_gen(7), **kw).images
    assert torch.equal(zero, plain)
    on = pipe("a cat", control_image=_image(0), generator=_gen(7), **kw).images
    assert not torch.equal(on, plain)
    union = _load(folders["flux"], folders["cn-union"])
    a = union("a cat", control_image=_image(0), control_mode=0, generator=_gen(7), **kw).images
    b = union("a cat", control_image=_image(0), control_mode=3, generator=_gen(7), **kw).images
    assert (a - b).abs().max() > 1e-4  # the mode reaches the net


def test_cache_sees_the_control_residuals(folders):
    """A cache policy that computes every block gives the uncached result: the residuals are added
    inside the block ranges the runner drives."""
    pipe = _load(folders["flux"], folders["cn-a"])
    kw = dict(height=H, width=W, num_inference_steps=4, seed=3, output_type="latent", control_image=_image(1))
    plain = pipe("a cat", **kw).images
    cached = pipe("a cat", cache="fbcache", cache_threshold=0.0, **kw)
    assert cached.stats["blocks_computed"] == cached.stats["blocks_total"]
    torch.testing.assert_close(cached.images, plain, rtol=0, atol=0)


def test_wrong_family_width_and_layouts_are_refused(folders, tmp_path):
    with pytest.raises(FamilyMismatchError, match="context_in_dim 32 vs the base's 48"):
        _load(folders["flux"], folders["cn-narrow"])
    sd3 = tiny_pipeline_folder(tmp_path / "sd3", "sd3.5-tiny-medium")
    with pytest.raises(FamilyMismatchError, match="FLUX.1 ControlNet.*SD3"):
        _load(sd3, folders["cn-a"])
    schnell = tiny_pipeline_folder(tmp_path / "schnell", "flux-tiny-schnell")
    with pytest.raises(FamilyMismatchError, match="guidance"):
        _load(schnell, folders["cn-a"])
    weights = next(folders["cn-a"].glob("*.safetensors"))
    transformer = next((folders["flux"] / "transformer").glob("*.safetensors"))  # single files: tests/loading
    with pytest.raises(FamilyMismatchError, match="not a ControlNet layout"):
        _load(folders["flux"], transformer)
    cfg = json.loads((folders["cn-a"] / "config.json").read_text())
    for name, changed, match in (
        ("xlabs", {"conditioning_embedding_channels": 16}, "input_hint_block"),
        ("multi", {"_class_name": "FluxMultiControlNetModel"}, "each ControlNet's folder"),
        ("modes", {"num_mode": 0}, "num_mode"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, **changed}))
        (folder / weights.name).write_bytes(weights.read_bytes())
        with pytest.raises(CheckpointError, match=match):
            _load(folders["flux"], folder)


def test_bad_requests_are_typed_errors_before_work(folders, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started")

    two = _load(folders["flux"], [folders["cn-a"], folders["cn-union"]])
    monkeypatch.setattr(two, "prepare_text", no_work)
    img = _image(0)
    kw = dict(height=H, width=W, num_inference_steps=2)
    with pytest.raises(InputError, match="pass control_image"):
        two("a cat", **kw)
    with pytest.raises(InputError, match="list of 2 images"):
        two("a cat", control_image=img, control_mode=[None, 1], **kw)
    with pytest.raises(InputError, match="controlnet_conditioning_scale has 3 values for 2"):
        two("a cat", control_image=[img, img], control_mode=[None, 1], controlnet_conditioning_scale=[1, 1, 1], **kw)
    with pytest.raises(InputError, match="control_mode has 1 values for 2"):
        two("a cat", control_image=[img, img], control_mode=[1], **kw)
    with pytest.raises(InputError, match="no control modes"):
        two("a cat", control_image=[img, img], control_mode=1, **kw)
    with pytest.raises(InputError, match="needs control_mode"):
        two("a cat", control_image=[img, img], **kw)
    with pytest.raises(InputError, match="modes 0 .. 3"):
        two("a cat", control_image=[img, img], control_mode=[None, 4], **kw)
    with pytest.raises(InputError, match="output size"):
        two("a cat", control_image=[torch.rand(3, H, W + 4), img], control_mode=[None, 1], **kw)
    with pytest.raises(InputError, match="output size"):  # with image-to-image too
        two("a cat", control_image=[torch.rand(3, H, W + 4), img], control_mode=[None, 1], image=img, **kw)
    mixed = _load(folders["flux"], [folders["cn-a"], folders["cn-short"]])
    monkeypatch.setattr(mixed, "prepare_text", no_work)
    with pytest.raises(InputError, match="different depths"):
        mixed("a cat", control_image=[img, img], **kw)
    plain = _load(folders["flux"])
    monkeypatch.setattr(plain, "prepare_text", no_work)
    with pytest.raises(InputError, match="takes no control_image"):
        plain("a cat", control_image=img, **kw)
    with pytest.raises(InputError, match="control_mode needs a union ControlNet"):
        plain("a cat", control_mode=1, **kw)
    with pytest.raises(InputError, match="no ControlNet"):
        plain("a cat", controlnet_conditioning_scale=0.5, **kw)


def test_every_flux_controlnet_config_field_is_in_a_table():
    import inspect

    from fastflow.loading import fields
    from fastflow.loading.controlnet import FLUX_CONTROLNET_FIELDS

    names = {n for n in inspect.signature(FluxControlNetModel.__init__).parameters if n not in ("self", "kwargs")}
    missing = names - set(fields.FLUX) - set(FLUX_CONTROLNET_FIELDS)
    assert not missing, sorted(missing)


def test_cli_union_controlnet(folders, tmp_path):
    from fastflow.cli import main

    image = tmp_path / "edges.png"
    _image(0).resize((W, H)).save(image)
    base = ["generate", "a cat", "--model", str(folders["flux"]), "--steps", "2", "--seed", "1", "--no-progress",
            "--device", "cpu", "--dtype", "float32", "--height", str(H), "--width", str(W)]  # fmt: skip
    net = ["--controlnet", str(folders["cn-union"]), "--control-image", str(image)]
    out = tmp_path / "out.png"
    assert main([*base, "-o", str(out), *net, "--control-mode", "2"]) == 0
    with Image.open(out) as png:
        assert json.loads(png.text["settings"])["controlnet"]["mode"] == [2]
    assert main([*base, "-o", str(tmp_path / "x.png"), *net]) == 2  # a union net needs its mode
    assert main([*base, "-o", str(tmp_path / "y.png"), *net, "--control-mode", "1", "--control-mode", "2"]) == 2


def test_fp8_applies_to_the_controlnet(folders):
    from fastflow.quant import Fp8Linear

    pipe = fastflow.load(folders["flux"], dtype=torch.float32, device="cpu", quant="fp8",
                         controlnet=folders["cn-union"])  # fmt: skip
    net = pipe.controlnets[0]
    assert any(isinstance(m, Fp8Linear) for m in net.double_blocks.modules())
    out = pipe("a cat", control_image=_image(0), control_mode=1, height=H, width=W, num_inference_steps=2, seed=0,
               output_type="latent", progress=False)  # fmt: skip
    assert torch.isfinite(out.images).all()
