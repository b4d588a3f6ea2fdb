"""Issue 35, ControlNets for SDXL and SD3: fastflow against diffusers' StableDiffusionXLControlNetPipeline
and StableDiffusion3ControlNetPipeline on tiny random models built by diffusers (the same folders loaded
by both; latents to 1e-5, images to 1/255), one and two ControlNets, the keep window, scale 0 equal to
no ControlNet, caching with control residuals, and the typed errors before any work."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

import fastflow
from fastflow.errors import CheckpointError, FamilyMismatchError, InputError
from fastflow.models import configs

from ..conftest import diffusers_sdxl_modules, diffusers_sdxl_scheduler, tiny_pipeline_folder

H, W = 32, 48  # SDXL: the tiny VAE and UNet halve once each
SD3_H, SD3_W = 24, 32  # SD3: the tiny MMDiT's position table is 8x8 patches


def _randomize(model, seed):
    """Every weight random (the zero-initialised convs / linears too), norm scales around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p) + 0.5 * p)
    return model.eval()


def sdxl_controlnet(folder, seed, **kw):
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32), **kw)
    return _randomize(net, seed)


def sd3_controlnet(folder, seed, layers=1, **kw):
    base = SD3Transformer2DModel.from_pretrained(folder / "transformer").config
    net = SD3ControlNetModel(
        sample_size=base.sample_size,
        patch_size=base.patch_size,
        in_channels=base.in_channels,
        num_layers=layers,
        attention_head_dim=base.attention_head_dim,
        num_attention_heads=base.num_attention_heads,
        joint_attention_dim=base.joint_attention_dim,
        caption_projection_dim=base.caption_projection_dim,
        pooled_projection_dim=base.pooled_projection_dim,
        out_channels=base.out_channels,
        pos_embed_max_size=base.pos_embed_max_size,
        dual_attention_layers=(0,),
        qk_norm=base.qk_norm,
        **kw,
    )
    net = _randomize(net, seed)
    with torch.no_grad():
        net.pos_embed.pos_embed.copy_(torch.randn_like(net.pos_embed.pos_embed))
    return net


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    out = {v: tiny_pipeline_folder(root / v, v) for v in ("sdxl-tiny", "sd3.5-tiny-medium")}
    sdxl_controlnet(out["sdxl-tiny"], 10).save_pretrained(root / "cn-sdxl-a")
    sdxl_controlnet(out["sdxl-tiny"], 11, controlnet_conditioning_channel_order="bgr").save_pretrained(
        root / "cn-sdxl-b"
    )
    sd3_controlnet(out["sd3.5-tiny-medium"], 12).save_pretrained(root / "cn-sd3-a")
    sd3_controlnet(out["sd3.5-tiny-medium"], 13, force_zeros_for_pooled_projection=False).save_pretrained(
        root / "cn-sd3-b"
    )
    sd3_controlnet(out["sd3.5-tiny-medium"], 14).save_pretrained(root / "cn-sd3-c")
    out.update({k: root / k for k in ("cn-sdxl-a", "cn-sdxl-b", "cn-sd3-a", "cn-sd3-b", "cn-sd3-c")})
    return out


def _load(folder, controlnet=None):
    pipe = fastflow.load(folder, dtype=torch.float32, device="cpu", controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed, h, w):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h + 5, w + 3, 3), dtype=np.uint8))  # resized by both


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _uint8(x):
    return (np.asarray(x) * 255).round().astype(int)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def diffusers_sdxl(folder, nets, ancestral=False, cls=StableDiffusionXLControlNetPipeline):
    """diffusers' SDXL ControlNet pipeline ``cls`` (text-to-image, image-to-image or inpainting)."""
    pipe = cls(
        **diffusers_sdxl_modules(folder),
        controlnet=[ControlNetModel.from_pretrained(n) for n in nets] if len(nets) > 1 else
        ControlNetModel.from_pretrained(nets[0]),
        scheduler=diffusers_sdxl_scheduler(configs.from_name("sdxl-tiny"), ancestral),
        add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


SDXL_CASES = {
    "one": dict(nets=("cn-sdxl-a",), scale=0.8, start=0.0, end=1.0),
    "one-window": dict(nets=("cn-sdxl-a",), scale=1.3, start=0.2, end=0.7),
    "two": dict(nets=("cn-sdxl-a", "cn-sdxl-b"), scale=[0.7, 1.2], start=[0.0, 0.25], end=[0.8, 1.0]),
}


@pytest.mark.parametrize("case", list(SDXL_CASES))
def test_sdxl_equals_diffusers(folders, case):
    c = SDXL_CASES[case]
    nets = [folders[n] for n in c["nets"]]
    images = [_image(i, H, W) for i in range(len(nets))]
    control = images if len(nets) > 1 else images[0]
    pipe = _load(folders["sdxl-tiny"], nets if len(nets) > 1 else nets[0])
    ref = diffusers_sdxl(folders["sdxl-tiny"], nets)
    prompts = ["a handwritten seven", "the number nine"]
    common = dict(height=H, width=W, num_inference_steps=5, guidance_scale=5.0,
                  controlnet_conditioning_scale=c["scale"], control_guidance_start=c["start"],
                  control_guidance_end=c["end"])  # fmt: skip
    ours = pipe(prompts, control_image=control, generator=_gens([3, 4]), output_type="latent", **common)
    theirs = ref(prompts, image=control, generator=_gens([3, 4]), output_type="latent", **common).images
    assert ours.settings["controlnet"]["scale"] == (c["scale"] if len(nets) > 1 else [c["scale"]])
    assert _rel(ours.images, theirs) <= 1e-5
    plain = _load(folders["sdxl-tiny"])(prompts, generator=_gens([3, 4]), output_type="latent", **{
        k: v for k, v in common.items() if not k.startswith("control")}).images  # fmt: skip
    assert _rel(ours.images, plain) > 1e-3  # the ControlNet changes the result
    ours_img = pipe(prompts, control_image=control, generator=_gens([3, 4]), output_type="np", **common).images
    theirs_img = ref(prompts, image=control, generator=_gens([3, 4]), output_type="np", **common).images
    assert np.abs(_uint8(ours_img) - _uint8(theirs_img)).max() <= 1


def test_sdxl_default_size_is_the_control_images(folders):
    pipe = _load(folders["sdxl-tiny"], folders["cn-sdxl-a"])
    out = pipe("a cat", control_image=Image.new("RGB", (W, H)), num_inference_steps=1, seed=0, output_type="latent")
    assert (out.settings["height"], out.settings["width"]) == (H, W)


def diffusers_sd3(folder, nets):
    none = {f"{part}{suffix}": None for part in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    return StableDiffusion3ControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer"),
        controlnet=[SD3ControlNetModel.from_pretrained(n) for n in nets] if len(nets) > 1 else
        SD3ControlNetModel.from_pretrained(nets[0]),
        **none,
    )  # fmt: skip


@pytest.fixture
def posterior_mean(monkeypatch):
    """diffusers samples the control image's posterior from the global RNG, unseeded; fastflow takes its
    mean: the reference is made to take it too."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


SD3_CASES = {
    "one": dict(nets=("cn-sd3-a",), scale=0.9, start=0.0, end=1.0, guidance=4.5),
    "one-window-no-cfg": dict(nets=("cn-sd3-b",), scale=1.5, start=0.1, end=0.6, guidance=1.0),
    # (diffusers reads force_zeros_for_pooled_projection of the first net for all; fastflow each net's
    # own: the two nets here agree)
    "two": dict(nets=("cn-sd3-a", "cn-sd3-c"), scale=[0.6, 1.1], start=0.0, end=[0.5, 1.0], guidance=4.0),
}


@pytest.mark.parametrize("case", list(SD3_CASES))
def test_sd3_equals_diffusers(folders, posterior_mean, case):
    c = SD3_CASES[case]
    nets = [folders[n] for n in c["nets"]]
    images = [_image(5 + i, SD3_H, SD3_W) for i in range(len(nets))]
    control = images if len(nets) > 1 else images[0]
    pipe = _load(folders["sd3.5-tiny-medium"], nets if len(nets) > 1 else nets[0])
    ctx, pooled = pipe.text_encoder(["a handwritten seven"])
    neg_ctx, neg_pooled = pipe.text_encoder([""])
    noise = torch.randn(1, 16, SD3_H // 2, SD3_W // 2, generator=torch.Generator().manual_seed(2))
    ref = diffusers_sd3(folders["sd3.5-tiny-medium"], nets)
    kw = dict(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ctx,
              negative_pooled_prompt_embeds=neg_pooled, height=SD3_H, width=SD3_W, num_inference_steps=6,
              guidance_scale=c["guidance"], controlnet_conditioning_scale=c["scale"],
              control_guidance_start=c["start"], control_guidance_end=c["end"])  # fmt: skip
    ours = pipe(control_image=control, latents=noise, sampler="euler", output_type="latent", **kw).images
    theirs = ref(control_image=control, latents=noise, output_type="latent", **kw).images
    assert _rel(ours, theirs) <= 1e-5
    ours_img = pipe(control_image=control, latents=noise, sampler="euler", output_type="np", **kw).images
    theirs_img = ref(control_image=control, latents=noise, output_type="np", **kw).images
    assert np.abs(_uint8(ours_img) - _uint8(theirs_img)).max() <= 1


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_scale_zero_is_no_controlnet(folders, family):
    base, net = ("sdxl-tiny", "cn-sdxl-a") if family == "sdxl" else ("sd3.5-tiny-medium", "cn-sd3-a")
    h, w = (H, W) if family == "sdxl" else (SD3_H, SD3_W)
    kw = dict(height=h, width=w, num_inference_steps=3, seed=7, output_type="latent", guidance_scale=4.0)
    plain = _load(folders[base])("a cat", **kw).images
    pipe = _load(folders[base], folders[net])
    zero = pipe("a cat", control_image=_image(0, h, w), controlnet_conditioning_scale=0.0, **kw).images
    assert torch.equal(zero, plain)
    on = pipe("a cat", control_image=_image(0, h, w), **kw).images
    assert not torch.equal(on, plain)


def test_sd3_cache_sees_the_control_residuals(folders):
    """A cache policy that computes every block gives the uncached result: the residuals are added
    inside the block ranges the runner drives."""
    pipe = _load(folders["sd3.5-tiny-medium"], folders["cn-sd3-a"])
    kw = dict(height=SD3_H, width=SD3_W, num_inference_steps=4, seed=3, output_type="latent",
              control_image=_image(1, SD3_H, SD3_W))  # fmt: skip
    plain = pipe("a cat", **kw).images
    cached = pipe("a cat", cache="fbcache", cache_threshold=0.0, **kw)
    assert cached.stats["blocks_computed"] == cached.stats["blocks_total"]
    torch.testing.assert_close(cached.images, plain, rtol=0, atol=0)


def test_wrong_family_and_width_are_refused(folders, tmp_path):
    with pytest.raises(FamilyMismatchError, match="SD3 / SD3.5 ControlNet.*SDXL"):
        _load(folders["sdxl-tiny"], folders["cn-sd3-a"])
    with pytest.raises(FamilyMismatchError, match="SDXL ControlNet.*SD3"):
        _load(folders["sd3.5-tiny-medium"], folders["cn-sdxl-a"])
    wide = tiny_pipeline_folder(tmp_path / "wide", "sd3-tiny-medium")  # same family, no qk-norm: fits
    base = SD3Transformer2DModel.from_pretrained(wide / "transformer").config
    narrow = SD3ControlNetModel(sample_size=base.sample_size, patch_size=2, in_channels=16, num_layers=1,
                                attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48,
                                caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8)  # fmt: skip
    narrow.save_pretrained(tmp_path / "narrow")
    with pytest.raises(FamilyMismatchError, match="hidden_size 64 vs the base's 128"):
        _load(wide, tmp_path / "narrow")


def test_layouts_that_cannot_be_verified_are_refused(folders, tmp_path):
    single = next(folders["cn-sdxl-a"].glob("*.safetensors"))
    unet = next((folders["sdxl-tiny"] / "unet").glob("*.safetensors"))  # single files: tests/loading
    with pytest.raises(FamilyMismatchError, match="not a ControlNet layout"):
        _load(folders["sdxl-tiny"], unet)
    flux = tmp_path / "flux-cn"
    flux.mkdir()
    (flux / "config.json").write_text(json.dumps({"_class_name": "FluxMultiControlNetModel"}))
    (flux / "diffusion_pytorch_model.safetensors").write_bytes(single.read_bytes())
    with pytest.raises(CheckpointError, match="each ControlNet's folder"):
        _load(folders["sdxl-tiny"], flux)
    pooled = tmp_path / "pooled"
    cfg = json.loads((folders["cn-sdxl-a"] / "config.json").read_text())
    pooled.mkdir()
    (pooled / "config.json").write_text(json.dumps({**cfg, "global_pool_conditions": True}))
    (pooled / "diffusion_pytorch_model.safetensors").write_bytes(single.read_bytes())
    with pytest.raises(CheckpointError, match="global_pool_conditions"):
        _load(folders["sdxl-tiny"], pooled)


def test_bad_requests_are_typed_errors_before_work(folders, monkeypatch):
    pipe = _load(folders["sdxl-tiny"], [folders["cn-sdxl-a"], folders["cn-sdxl-b"]])
    img = _image(0, H, W)

    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(pipe, "prepare_text", no_work)
    kw = dict(height=H, width=W, num_inference_steps=2)
    with pytest.raises(InputError, match="pass control_image"):
        pipe("a cat", **kw)
    with pytest.raises(InputError, match="list of 2 images"):
        pipe("a cat", control_image=img, **kw)
    with pytest.raises(InputError, match="controlnet_conditioning_scale has 3 values for 2"):
        pipe("a cat", control_image=[img, img], controlnet_conditioning_scale=[1.0, 1.0, 1.0], **kw)
    with pytest.raises(InputError, match="control_guidance_end has 1 values for 2"):
        pipe("a cat", control_image=[img, img], control_guidance_end=[0.5], **kw)
    with pytest.raises(InputError, match="start < end"):
        pipe("a cat", control_image=[img, img], control_guidance_start=0.6, control_guidance_end=0.4, **kw)
    with pytest.raises(InputError, match="finite number"):
        pipe("a cat", control_image=[img, img], controlnet_conditioning_scale=float("nan"), **kw)
    with pytest.raises(InputError, match="output size"):
        pipe("a cat", control_image=[torch.rand(3, H, W + 4), img], **kw)
    plain = _load(folders["sdxl-tiny"])
    monkeypatch.setattr(plain, "prepare_text", no_work)
    with pytest.raises(InputError, match="needs a ControlNet"):
        plain("a cat", control_image=img, **kw)
    with pytest.raises(InputError, match="no ControlNet"):
        plain("a cat", controlnet_conditioning_scale=0.5, **kw)
    sd3 = _load(folders["sd3.5-tiny-medium"], folders["cn-sd3-a"])
    monkeypatch.setattr(sd3, "prepare_text", no_work)
    with pytest.raises(InputError, match="skip-layer guidance"):
        sd3("a cat", control_image=img, skip_guidance_layers=[0], height=SD3_H, width=SD3_W)


def test_every_controlnet_config_field_is_in_a_table():
    """Every ControlNetModel / SD3ControlNetModel config field is honoured, refused or irrelevant:
    the base model's table (loading/fields.py) or the ControlNet's own (loading/controlnet.py)."""
    import inspect

    from fastflow.loading import fields
    from fastflow.loading.controlnet import SD3_CONTROLNET_FIELDS, UNET_CONTROLNET_FIELDS

    for cls, tables in ((ControlNetModel, (fields.UNET, UNET_CONTROLNET_FIELDS)),
                        (SD3ControlNetModel, (fields.SD3, SD3_CONTROLNET_FIELDS))):  # fmt: skip
        names = {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs", "args")}
        missing = names - set(tables[0]) - set(tables[1])
        assert not missing, f"{cls.__name__}: {sorted(missing)}"


def test_cli_controlnet(folders, tmp_path):
    from fastflow.cli import main

    image = tmp_path / "edges.png"
    _image(0, H, W).resize((W, H)).save(image)
    out = tmp_path / "out.png"
    base = ["generate", "a cat", "--model", str(folders["sdxl-tiny"]), "--steps", "2", "--seed", "1", "--no-progress",
            "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    args = [*base, "-o", str(out), "--controlnet", str(folders["cn-sdxl-a"]), "--control-image", str(image),
            "--controlnet-scale", "0.5"]  # fmt: skip
    assert main(args) == 0
    with Image.open(out) as png:
        assert png.size == (W, H)  # the control image's size
        assert json.loads(png.text["settings"])["controlnet"]["scale"] == [0.5]
    assert main([*base, "-o", str(tmp_path / "x.png"), "--controlnet", str(folders["cn-sdxl-a"])]) == 2


def test_nets_follow_the_base_models_dtype(folders):
    """After pipe.to(...) the nets are moved / cast to the base model's device and dtype at the call."""
    pipe = _load(folders["sdxl-tiny"], folders["cn-sdxl-a"])
    kw = dict(height=H, width=W, num_inference_steps=2, seed=1, output_type="latent", control_image=_image(2, H, W))
    ref = pipe("a cat", **kw).images
    pipe.controlnets[0].to(torch.float64)  # (exact round trip)
    assert torch.equal(pipe("a cat", **kw).images, ref)
    assert pipe.controlnets[0].dtype == torch.float32


def test_mmdit_adds_residuals_where_diffusers_does(tmp_path):
    """Three residuals on a four-block MMDiT: diffusers' interval (4 / 3) picks residual 0, 0, 1 for
    blocks 0-2 and none after the pre-only last block; equal to SD3Transformer2DModel's forward."""
    from fastflow.loading import load_transformer

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=64,
                                num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=128,
                                pooled_projection_dim=32, out_channels=16, pos_embed_max_size=8).eval()  # fmt: skip
    _randomize(ref, 1)
    ref.save_pretrained(tmp_path / "t")
    ours = load_transformer(tmp_path / "t", dtype=torch.float32)
    x, ctx, y = torch.randn(2, 16, 8, 12), torch.randn(2, 5, 48), torch.randn(2, 32)
    t = torch.tensor([500.0, 250.0])
    controls = [torch.randn(2, 24, 128) for _ in range(3)]
    with torch.no_grad():
        theirs = ref(x, ctx, y, t, block_controlnet_hidden_states=controls, return_dict=False)[0]
        got = ours(x, t, ctx, y, controls=controls)
        plain = ours(x, t, ctx, y)
    assert _rel(got, theirs) <= 1e-5
    assert _rel(got, plain) > 1e-3


def test_fp8_applies_to_the_controlnet(folders):
    from fastflow.quant import Fp8Linear

    pipe = fastflow.load(folders["sd3.5-tiny-medium"], dtype=torch.float32, device="cpu", quant="fp8",
                         controlnet=folders["cn-sd3-a"])  # fmt: skip
    assert any(isinstance(m, Fp8Linear) for m in pipe.controlnets[0].joint_blocks.modules())
    out = pipe("a cat", control_image=_image(0, SD3_H, SD3_W), height=SD3_H, width=SD3_W, num_inference_steps=2,
               seed=0, output_type="latent", progress=False)  # fmt: skip
    assert torch.isfinite(out.images).all()
