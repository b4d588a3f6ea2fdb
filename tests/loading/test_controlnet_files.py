"""Issue 35, single-file ControlNets: a tiny net saved by diffusers (save_pretrained), its safetensors
file alone (no config.json) loads to the same config, tensors and outputs as its folder, for SDXL
ControlNetModel, SD3ControlNetModel and FluxControlNetModel (plain and union); an SDXL net in the
original cldm names (renamed here from diffusers' published conversion facts, with and without
``control_model.``) loads to the same outputs; other layouts are typed refusals naming the file."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxTransformer2DModel,
    SD3ControlNetModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file

import fastflow
from fastflow.errors import (
    CheckpointError,
    FamilyMismatchError,
    InputError,
    MissingKeysError,
    ShapeMismatchError,
)
from fastflow.loading.controlnet import load_controlnet
from fastflow.models.configs import from_name
from fastflow.models.flux import unpack_latents

from ..conftest import diffusers_flux_scheduler, tiny_diffusers_flux, tiny_diffusers_unet, tiny_pipeline_folder


def _randomize(model, seed):
    """Every weight random (the zero-initialised layers too), norm scales around 1."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = "norm" in name and p.ndim == 1 and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if scale else 0.1 * torch.randn_like(p))
    return model.eval()


def flux_net(seed, **kw):
    c = from_name("flux-tiny-dev")
    args = dict(patch_size=1, in_channels=c.in_channels, num_layers=2, num_single_layers=1,
                attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
                pooled_projection_dim=c.vec_in_dim, guidance_embeds=True, axes_dims_rope=c.axes_dim)  # fmt: skip
    return _randomize(FluxControlNetModel(**{**args, **kw}), seed)


def xlabs_net(seed):
    """diffusers' form of an XLabs net: a pixel-space input_hint_block, maps packed 2x2 (patch_size 2)."""
    return flux_net(seed, patch_size=2, num_single_layers=0, conditioning_embedding_channels=16)


def sd3_net(seed, heads=None, head_dim=None, qk_norm="rms_norm", **kw):
    c = from_name("sd3.5-tiny-medium")
    heads, head_dim = heads or c.num_heads, head_dim or c.head_dim
    net = SD3ControlNetModel(
        sample_size=2 * c.pos_embed_max_size,
        patch_size=c.patch_size,
        in_channels=c.in_channels,
        num_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=c.context_in_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=c.adm_in_dim,
        out_channels=c.out_channels,
        pos_embed_max_size=c.pos_embed_max_size,
        dual_attention_layers=(0,),
        qk_norm=qk_norm,
        **kw,
    )
    net = _randomize(net, seed)
    with torch.no_grad():
        net.pos_embed.pos_embed.copy_(torch.randn_like(net.pos_embed.pos_embed))
    return net


def sdxl_net(seed):
    net = ControlNetModel.from_unet(tiny_diffusers_unet(), conditioning_embedding_out_channels=(16, 24, 32))
    return _randomize(net, seed)


NETS = {  # name: (builder, base variant)
    "sdxl": (lambda: sdxl_net(1), "sdxl-tiny"),
    "sd3": (lambda: sd3_net(2, extra_conditioning_channels=1), "sd3.5-tiny-medium"),
    "flux": (lambda: flux_net(3), "flux-tiny-dev"),
    "flux-union": (lambda: flux_net(4, num_mode=5), "flux-tiny-dev"),
    "flux-xlabs": (lambda: xlabs_net(6), "flux-tiny-dev"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each net's diffusers folder, and its weights file alone in another folder."""
    root = tmp_path_factory.mktemp("cn-files")
    out = {}
    for name, (build, _) in NETS.items():
        build().save_pretrained(root / name)
        alone = root / f"{name}-alone"
        alone.mkdir()
        shutil.copy(root / name / "diffusion_pytorch_model.safetensors", alone / f"{name}.safetensors")
        out[name] = (root / name, alone / f"{name}.safetensors")
    return out


def _inputs(net, seed):
    """Random inputs of the right shapes for one of our ControlNet modules."""
    g = torch.Generator().manual_seed(seed)
    c = net.config

    def r(*shape):
        return torch.randn(*shape, generator=g)

    if c.family == "flux":
        n, t = 12, 5
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
        return dict(img=r(1, n, c.in_channels), txt=r(1, t, c.context_in_dim), y=r(1, c.vec_in_dim),
                    timesteps=torch.tensor([0.7]), img_ids=ids.reshape(n, 3), txt_ids=torch.zeros(t, 3),
                    guidance=torch.tensor([3.5]), control=r(1, 3, 48, 64) if hasattr(c, "hint_channels")
                    else r(1, n, c.in_channels), mode=2 if c.num_mode else None)  # fmt: skip
    if c.family == "sd3":
        control = r(1, c.in_channels + c.extra_conditioning_channels, 8, 12)
        return dict(x=r(1, c.in_channels, 8, 12), timesteps=torch.tensor([700.0]), context=r(1, 6, c.context_in_dim),
                    y=r(1, c.adm_in_dim), control=control)  # fmt: skip
    return dict(x=r(1, c.in_channels, 8, 8), timesteps=torch.tensor([700.0]), context=r(1, 6, c.context_dim),
                pooled=r(1, c.pooled_dim), time_ids=r(1, 6), control=torch.rand(1, 3, 32, 32, generator=g))  # fmt: skip


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def _same(a, b):
    """Same class, config, tensors and outputs (torch.equal)."""
    assert type(a) is type(b)
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        inputs = _inputs(a, 0)
        oa, ob = _flat(a(**inputs)), _flat(b(**inputs))
    assert len(oa) == len(ob) > 0
    assert all(torch.equal(x, y) for x, y in zip(oa, ob, strict=True))
    assert any(x.abs().sum() > 0 for x in oa)


@pytest.mark.parametrize("name", list(NETS))
def test_a_lone_diffusers_file_loads_as_its_folder(saved, name):
    folder, alone = saved[name]
    base = from_name(NETS[name][1])
    _same(load_controlnet(folder, base), load_controlnet(alone, base))


def test_a_weights_file_inside_its_folder_reads_the_folder_config(saved, tmp_path):
    """The file of a diffusers folder honours that folder's config.json (a field the shapes cannot
    show, here the bgr channel order), rather than inferring the config."""
    folder = tmp_path / "bgr"
    shutil.copytree(saved["sdxl"][0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "controlnet_conditioning_channel_order": "bgr"}))
    base = from_name("sdxl-tiny")
    net = load_controlnet(folder / "diffusion_pytorch_model.safetensors", base)
    assert net.config.bgr
    assert not load_controlnet(saved["sdxl"][1], base).config.bgr


def test_the_union_net_keeps_its_modes(saved):
    net = load_controlnet(saved["flux-union"][1], from_name("flux-tiny-dev"))
    assert net.config.num_mode == 5 and net.union
    plain = load_controlnet(saved["flux"][1], from_name("flux-tiny-dev"))
    assert plain.config.num_mode is None and not plain.union


def _resnet(tail):
    """diffusers ResnetBlock2D names -> ldm ResBlock names (diffusers' conversion facts)."""
    pairs = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
             ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))  # fmt: skip
    for new, old in pairs:
        if tail.startswith(new + "."):
            return old + tail[len(new) :]
    raise AssertionError(tail)


def to_original(sd: dict, layers: int, hint_blocks: int, prefix: str = "") -> dict:
    """A diffusers ControlNetModel state dict in lllyasviel's cldm names, written from diffusers'
    published mapping (single_file_utils: DIFFUSERS_TO_LDM_MAPPING["controlnet"] and
    convert_controlnet_checkpoint), independently of fastflow's loader."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * hint_blocks + 2}",
             "controlnet_mid_block": "middle_block_out.0", "mid_block.resnets.0": "middle_block.0",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2"}  # fmt: skip
    out = {}
    for key, value in sd.items():
        name, param = key.rsplit(".", 1)
        p = name.split(".")
        if name in fixed:
            new = fixed[name]
        elif name.startswith(("mid_block.resnets.0.", "mid_block.resnets.1.")):
            new = f"middle_block.{2 * int(p[2])}.{_resnet('.'.join(p[3:]) + '.')[:-1]}"
        elif name.startswith("mid_block.attentions.0."):
            new = "middle_block.1." + ".".join(p[3:])
        elif p[0] == "controlnet_cond_embedding":  # blocks.i
            new = f"input_hint_block.{2 * int(p[2]) + 2}"
        elif p[0] == "controlnet_down_blocks":
            new = f"zero_convs.{p[1]}.0"
        elif p[0] == "down_blocks" and p[2] == "downsamplers":
            new = f"input_blocks.{(int(p[1]) + 1) * (layers + 1)}.0.op"
        elif p[0] == "down_blocks":
            i = 1 + int(p[1]) * (layers + 1) + int(p[3])
            rest = ".".join(p[4:]) + "."
            new = f"input_blocks.{i}.0.{_resnet(rest)[:-1]}" if p[2] == "resnets" else f"input_blocks.{i}.1.{rest[:-1]}"
        else:
            raise AssertionError(key)
        out[f"{prefix}{new}.{param}"] = value
    assert len(out) == len(sd)
    return out


@pytest.mark.parametrize("prefix", ["", "control_model."])
def test_an_original_sdxl_file_loads_as_the_diffusers_folder(saved, tmp_path, prefix):
    folder, alone = saved["sdxl"]
    sd = load_file(alone)
    original = to_original(sd, layers=2, hint_blocks=4, prefix=prefix)
    assert "input_hint_block.10.weight" in {k[len(prefix) :] for k in original}
    save_file(original, tmp_path / "cldm.safetensors")
    base = from_name("sdxl-tiny")
    _same(load_controlnet(folder, base), load_controlnet(tmp_path / "cldm.safetensors", base))


def _write(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, path)
    return path


def test_other_layouts_are_typed_refusals(saved, tmp_path):
    flux = from_name("flux-tiny-dev")
    sdxl = from_name("sdxl-tiny")
    cases = [
        ({"input_hint_block.0.weight": (16, 3, 3, 3), "pos_embed_input.weight": (64, 64),
          "double_blocks.0.img_mod.lin.weight": (384, 64)}, flux, MissingKeysError, "img_in.weight"),  # x-flux
        ({"input_hint_block.0.weight": (16, 3, 3, 3), "zero_convs.0.0.weight": (32, 32, 1, 1),
          "time_embed.0.weight": (128, 32)}, sdxl, FamilyMismatchError, "SD 1.x"),
        ({"control_add_embedding.linear_1.weight": (128, 64), "conv_in.weight": (32, 4, 3, 3)}, sdxl,
         CheckpointError, "union"),
        ({"img_in.weight": (64, 64)}, flux, FamilyMismatchError, "not a ControlNet layout"),
    ]  # fmt: skip
    for i, (tensors, base, exc, match) in enumerate(cases):
        path = _write(tmp_path / f"case{i}.safetensors", tensors)
        with pytest.raises(exc, match=match) as e:
            load_controlnet(path, base)
        assert str(path) in str(e.value)


def test_another_family_width_missing_or_misshaped_tensors_are_refused(saved, tmp_path):
    with pytest.raises(FamilyMismatchError, match="FLUX.1 ControlNet.*SDXL"):
        load_controlnet(saved["flux"][1], from_name("sdxl-tiny"))
    with pytest.raises(FamilyMismatchError, match="context_in_dim 48 vs the base's 32"):
        load_controlnet(saved["flux"][1], from_name("flux-tiny-dev").replace(context_in_dim=32))
    sd = load_file(saved["sd3"][1])
    broken = dict(sd)
    del broken["controlnet_blocks.1.weight"]
    save_file(broken, tmp_path / "missing.safetensors")
    with pytest.raises(MissingKeysError, match="controlnet_blocks.1.weight"):
        load_controlnet(tmp_path / "missing.safetensors", from_name("sd3.5-tiny-medium"))
    broken = {**sd, "controlnet_blocks.0.bias": torch.zeros(3)}
    save_file(broken, tmp_path / "shape.safetensors")
    with pytest.raises(ShapeMismatchError, match="controlnet_blocks.0.bias"):
        load_controlnet(tmp_path / "shape.safetensors", from_name("sd3.5-tiny-medium"))


def test_a_head_count_the_file_cannot_show_is_refused(tmp_path):
    """No qk-norm: the head width is the base's (64); a 96-wide net cannot be split into its heads."""
    sd3_net(5, heads=3, head_dim=32, qk_norm=None).save_pretrained(tmp_path / "n")
    (tmp_path / "n" / "config.json").unlink()  # the lone file: no config.json beside it
    with pytest.raises(CheckpointError, match="head count.*config.json"):
        load_controlnet(tmp_path / "n" / "diffusion_pytorch_model.safetensors", from_name("sd3-tiny-medium"))


def test_an_xlabs_net_equals_diffusers_xlabs_path(saved):
    """diffusers' FluxControlNetModel with conditioning_embedding_channels is XLabs' net; its block
    samples, times the scale, go to the base's double block i as sample i % 2
    (controlnet_blocks_repeat): ours returns them so for a 5-block base, no single residuals."""
    folder, _ = saved["flux-xlabs"]
    ref = FluxControlNetModel.from_pretrained(folder).eval()
    ours = load_controlnet(folder, from_name("flux-tiny-dev").replace(depth=5))
    x = _inputs(ours, 1)
    with torch.no_grad():
        doubles, singles = ours(**x, scale=0.7)
        samples, single_samples = ref(hidden_states=x["img"], controlnet_cond=x["control"],
                                      encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                                      timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"],
                                      guidance=x["guidance"], conditioning_scale=0.7, return_dict=False)  # fmt: skip
    assert len(samples) == 2 and single_samples is None and singles == [] and len(doubles) == 5
    for i, d in enumerate(doubles):
        want = samples[i % 2]
        assert ((d - want).abs().max() / want.abs().max()).item() <= 1e-5


def to_xflux(state: dict) -> dict:
    """One of our XLabs modules' state dict in x-flux's ControlNetFlux names. Facts from x-flux's
    src/flux/controlnet.py: the transformer layers are BFL's (img_in, time_in, vector_in,
    guidance_in, txt_in, double_blocks: our names), input_hint_block an nn.Sequential with the
    convs at 0, 2, ..., 14 (ours too), the control input's linear ``pos_embed_input``."""
    out = {}
    for key, value in state.items():
        name = key.replace("controlnet_x_embedder.", "pos_embed_input.")
        assert not name.startswith(("controlnet_single_blocks", "single_blocks", "controlnet_mode")), key
        out[name] = value.contiguous()
    assert {k for k in out if k.startswith("input_hint_block.")} == {
        f"input_hint_block.{i}.{p}" for i in range(0, 15, 2) for p in ("weight", "bias")
    }
    return out


def test_an_xflux_file_loads_as_the_diffusers_folder(saved, tmp_path):
    folder, _ = saved["flux-xlabs"]
    base = from_name("flux-tiny-dev")
    from_folder = load_controlnet(folder, base)
    save_file(to_xflux(from_folder.state_dict()), tmp_path / "flux-canny-controlnet.safetensors")
    from_file = load_controlnet(tmp_path / "flux-canny-controlnet.safetensors", base)
    _same(from_folder, from_file)
    assert from_file.config.base_depth == base.depth and from_file.pixel_control


def _vae8(seed):
    """A tiny AutoencoderKL that downsamples 8x, as FLUX.1's (XLabs' hint stack assumes it: the
    control image / 16 is the token grid)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32,) * 4, layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False).eval()  # fmt: skip
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "norm" not in name:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    return vae


def test_an_xlabs_net_in_the_pipeline_equals_diffusers(tmp_path):
    """fastflow's FLUX pipeline with an XLabs net against diffusers' FluxControlNetPipeline (its XLabs
    path: the control image not encoded, residuals repeated): latents to 1e-5. A 3-block base, so
    that block 2 takes residual 0 (repeat), not 1 (InstantX's interval)."""
    base = tiny_pipeline_folder(tmp_path / "flux", "flux-tiny-dev")
    tiny_diffusers_flux("flux-tiny-dev", 0, depth=3, depth_single_blocks=2).save_pretrained(base / "transformer")
    shutil.rmtree(base / "vae")
    _vae8(1).save_pretrained(base / "vae")
    xlabs_net(7).save_pretrained(tmp_path / "xlabs")
    h, w = 48, 64  # 6 x 8 latents, 3 x 4 tokens; the hint stack: 6 x 8 maps, packed 3 x 4
    pipe = fastflow.load(base, dtype=torch.float32, device="cpu", controlnet=tmp_path / "xlabs")
    pipe.set_progress_bar_config(disable=True)
    txt, y = pipe.text_encoder(["a house"])
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h + 5, w + 3, 3), dtype=np.uint8))  # resized by both
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, num_inference_steps=3, guidance_scale=3.5, height=h,
              width=w, control_image=image, controlnet_conditioning_scale=0.8)  # fmt: skip
    ours = pipe(generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images
    ref = FluxControlNetPipeline(
        scheduler=diffusers_flux_scheduler(dynamic=True),
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=FluxTransformer2DModel.from_pretrained(base / "transformer"),
        controlnet=FluxControlNetModel.from_pretrained(tmp_path / "xlabs"),
    )  # fmt: skip
    theirs = unpack_latents(ref(generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images, 6, 8)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5
    kw["controlnet_conditioning_scale"] = 0.0
    plain = pipe(generator=torch.Generator().manual_seed(5), output_type="latent", **kw).images
    assert not torch.allclose(plain, ours)  # the net changes the result
    flux_net(3).save_pretrained(tmp_path / "instantx")
    mixed = fastflow.load(
        base, dtype=torch.float32, device="cpu", controlnet=[tmp_path / "xlabs", tmp_path / "instantx"]
    )
    with pytest.raises(InputError, match="XLabs"):
        mixed(**{**kw, "control_image": [image, image], "controlnet_conditioning_scale": 1.0})
