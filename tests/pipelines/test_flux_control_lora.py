"""FLUX.1 Canny / Depth LoRAs (BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora) on FLUX.1 dev:
against diffusers' FluxControlPipeline after ``load_lora_weights`` on a tiny random dev folder (a
tiny control LoRA in BFL's layout built here: every linear layer, img_in's lora_A twice as wide,
lora_B biases, the QK-norm scales; and the same in diffusers' layout), what the pipeline becomes
(Canny or Depth, defaults), unloading back to dev bit for bit, the typed refusals, and the
full-size key / shape list of the published files against our mapping."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import FluxControlPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

import fastflow
from fastflow import errors
from fastflow.adapters import control as control_lora
from fastflow.adapters.formats import linear_layers, parse
from fastflow.models import Flux, from_name
from fastflow.models.flux import unpack_latents

from ..conftest import diffusers_flux_scheduler
from .test_flux_fill_control import _gen, _image
from .test_parity import _modules, _rel

H, W = 24, 40
KEYS = json.loads((Path(__file__).parent.parent / "data" / "flux_control_lora_key_shapes.json").read_text())


def _bfl_lora(seed: int = 0, rank: int = 4, width: int | None = None, norms: bool = True) -> dict:
    """A control LoRA of the tiny dev model in BFL's layout (FluxLoraWrapper): for every linear
    layer of the official model lora_A [min(rank, in, out), in] (img_in: twice dev's inputs, or
    ``width``), lora_B [out, r] and its bias; and every QK-norm scale."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(from_name("flux-tiny-dev")).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("_norm.scale") and norms:
            state[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith(".weight") and len(shape) == 2:
            layer, (out, inp) = key[: -len(".weight")], shape
            inp = (width or 2 * inp) if layer == "img_in" else inp
            r = min(rank, inp, out)
            state[f"{layer}.lora_A.weight"] = 0.2 * torch.randn(r, inp, generator=g)
            state[f"{layer}.lora_B.weight"] = 0.2 * torch.randn(out, r, generator=g)
            state[f"{layer}.lora_B.bias"] = 0.05 * torch.randn(out, generator=g)
    return state


_SIMPLE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {  # (img names, txt names)
    "mod.lin": (["norm1.linear"], ["norm1_context.linear"]),
    "attn.qkv": (["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    "attn.proj": (["attn.to_out.0"], ["attn.to_add_out"]),
    "mlp.0": (["ff.net.0.proj"], ["ff_context.net.0.proj"]),
    "mlp.2": (["ff.net.2"], ["ff_context.net.2"]),
}


def _to_diffusers(bfl: dict, hidden: int = 64, mlp: int = 256) -> dict:
    """BFL's names -> diffusers', as diffusers' _convert_bfl_flux_control_lora_to_diffusers does
    (written out here for the tiny sizes: that function's block counts and widths are FLUX.1's):
    fused layers' lora_B (and bias) split into q / k / v (and the single blocks' MLP), lora_A
    repeated; the final modulation's halves swapped; the norms renamed."""
    out = {}
    for key, t in bfl.items():
        if key.endswith("_norm.scale"):
            m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.norm\.(query|key)_norm\.scale", key)
            if m:
                name = f"transformer_blocks.{m[1]}.attn.norm_{'added_' if m[2] == 'txt' else ''}{m[3][0]}"
            else:
                m = re.fullmatch(r"single_blocks\.(\d+)\.norm\.(query|key)_norm\.scale", key)
                name = f"single_transformer_blocks.{m[1]}.attn.norm_{m[2][0]}"
            out[f"transformer.{name}.weight"] = t
            continue
        layer, kind = key.split(".lora_")
        kind = "lora_" + kind
        m = re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_(.+)", layer)
        s = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", layer)
        if layer in _SIMPLE:
            names, sizes = [_SIMPLE[layer]], None
        elif layer == "final_layer.adaLN_modulation.1":
            names, sizes = ["norm_out.linear"], None
            if kind != "lora_A.weight":
                shift, scale = t.chunk(2, dim=0)
                t = torch.cat((scale, shift))
        elif m:
            names = [f"transformer_blocks.{m[1]}.{n}" for n in _DOUBLE[m[3]][m[2] == "txt"]]
            sizes = [hidden] * 3 if len(names) == 3 else None
        else:
            block = f"single_transformer_blocks.{s[1]}"
            parts = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
                     "modulation.lin": ["norm.linear"]}[s[2]]  # fmt: skip
            names = [f"{block}.{n}" for n in parts]
            sizes = [hidden, hidden, hidden, mlp] if len(parts) == 4 else None
        pieces = [t] * len(names) if kind == "lora_A.weight" or sizes is None else torch.split(t, sizes, dim=0)
        for name, piece in zip(names, pieces, strict=True):
            out[f"transformer.{name}.{kind}"] = piece.clone()
    return out


def _save(tmp_path, name: str, state: dict, metadata=None) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _reference(folder, state: dict, scale: float = 1.0):
    ref = FluxControlPipeline(
        scheduler=diffusers_flux_scheduler(dynamic=True),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        **_modules(folder, FluxTransformer2DModel),
    )  # fmt: skip
    ref.load_lora_weights(dict(state), adapter_name="canny")
    if scale != 1.0:
        ref.set_adapters(["canny"], [scale])
    return ref


def _kw(pipe, n: int = 1):
    txt, y = pipe.text_encoder(["a house"])
    control = fastflow.canny(_image(seed=1), 100, 200)
    return {"prompt_embeds": txt, "pooled_prompt_embeds": y, "num_inference_steps": 3, "guidance_scale": 30.0,
            "control_image": control, "num_images_per_prompt": n}  # fmt: skip


def _latents_equal(pipe, ref, kw) -> None:
    ours = pipe(generator=_gen(5), output_type="latent", **kw)
    theirs = ref(height=H, width=W, generator=_gen(5), output_type="latent", **kw)
    assert (ours.settings["height"], ours.settings["width"]) == (H, W)
    assert _rel(ours.images, unpack_latents(theirs.images, H // 2, W // 2)) <= 1e-5


@pytest.mark.parametrize("layout,fuse,n", [("bfl", False, 1), ("diffusers", False, 2), ("bfl", True, 1)])
def test_control_lora_equals_diffusers(load, pipeline_folders, tmp_path, layout, fuse, n):
    """diffusers' FluxControlPipeline on dev + load_lora_weights (x_embedder widened, norms loaded,
    PEFT with lora_B biases) vs fastflow's dev + load_lora, unfused and fused, BFL's and
    diffusers' file layouts."""
    bfl = _bfl_lora()
    pipe = load("flux-tiny-dev")
    path = _save(tmp_path, "flux1-canny-dev-lora.safetensors", bfl if layout == "bfl" else _to_diffusers(bfl))
    assert pipe.load_lora(path, fuse=fuse) == "flux1-canny-dev-lora"
    assert pipe.config.conditioning == "control" and pipe.transformer.img_in.weight.shape == (64, 128)
    _latents_equal(pipe, _reference(pipeline_folders["flux-tiny-dev"], _to_diffusers(bfl)), _kw(pipe, n))


def test_scales_fusing_and_a_lora_after_it(load, pipeline_folders, tmp_path):
    """A scale scales the low-rank parts and their biases, not the norms (diffusers' set_adapters);
    fused equals unfused at that scale; a dev LoRA loaded after it has its x_embedder lora_A
    zero-padded to the wider img_in (diffusers' _maybe_expand_lora_state_dict)."""
    bfl = _bfl_lora()
    pipe = load("flux-tiny-dev")
    path = _save(tmp_path, "flux1-canny-dev-lora.safetensors", bfl)
    pipe.load_lora(path, name="canny", scale=0.6)
    ref = _reference(pipeline_folders["flux-tiny-dev"], _to_diffusers(bfl), scale=0.6)
    kw = _kw(pipe)
    _latents_equal(pipe, ref, kw)
    pipe.fuse_lora()
    _latents_equal(pipe, ref, kw)
    pipe.unfuse_lora()
    pipe.set_lora_scales(canny=1.0)
    assert _rel(pipe(generator=_gen(5), output_type="latent", **kw).images,
                _fresh(load, path, kw)) <= 1e-6  # fmt: skip
    g = torch.Generator().manual_seed(3)
    style = {"transformer.x_embedder.lora_A.weight": 0.2 * torch.randn(2, 64, generator=g),
             "transformer.x_embedder.lora_B.weight": 0.2 * torch.randn(64, 2, generator=g)}  # fmt: skip
    pipe.load_lora(_save(tmp_path, "style.safetensors", style), name="style")
    ref.set_adapters(["canny"], [1.0])
    ref.load_lora_weights(dict(style), adapter_name="style")
    ref.set_adapters(["canny", "style"], [1.0, 1.0])
    _latents_equal(pipe, ref, kw)


def _fresh(load, path, kw):
    pipe = load("flux-tiny-dev")
    pipe.load_lora(path)
    return pipe(generator=_gen(5), output_type="latent", **kw).images


@pytest.mark.parametrize("fuse", [False, True])
def test_unloading_restores_dev_exactly(load, tmp_path, fuse):
    pipe = load("flux-tiny-dev")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config, defaults = pipe.config, dict(pipe.defaults)
    kw = {"num_inference_steps": 2, "seed": 0, "output_type": "latent", "height": H, "width": W}
    plain = pipe("x", **kw).images
    pipe.load_lora(_save(tmp_path, "flux1-canny-dev-lora.safetensors", _bfl_lora()), name="c", fuse=fuse)
    assert pipe.config.name == "flux-tiny-canny" and pipe.transformer.config is pipe.config
    pipe("x", control_image=_image(seed=2), **kw)
    pipe.unfuse_lora() if fuse else pipe.fuse_lora()  # the other form, then back by unloading
    pipe.set_lora_scales(c=0.3)
    pipe.unload_lora("c")
    after = pipe.transformer.state_dict()
    assert sorted(after) == sorted(before)
    assert [k for k in before if not torch.equal(after[k], before[k])] == []
    assert type(pipe.transformer.img_in) is torch.nn.Linear
    assert pipe.config is config and pipe.transformer.config is config and pipe.defaults == defaults
    assert torch.equal(pipe("x", **kw).images, plain)
    with pytest.raises(errors.InputError, match="takes no control_image"):
        pipe("x", control_image=_image(seed=2), **kw)


@pytest.mark.parametrize(
    "file,metadata,variant,expected,guidance",
    [
        ("flux1-canny-dev-lora.safetensors", None, None, "flux-tiny-canny", 30.0),
        ("flux1-depth-dev-lora.safetensors", None, None, "flux-tiny-depth", 10.0),
        ("lora.safetensors", {"modelspec.title": "FLUX.1 Depth [dev] LoRA"}, None, "flux-tiny-depth", 10.0),
        ("flux1-canny-dev-lora.safetensors", None, "flux-depth-dev", "flux-tiny-depth", 10.0),
        ("flux1-depth-dev-lora.safetensors", None, "canny", "flux-tiny-canny", 30.0),
    ],
)
def test_canny_or_depth_from_the_name_metadata_or_variant(load, tmp_path, file, metadata, variant, expected, guidance):
    pipe = load("flux-tiny-dev")
    pipe.load_lora(_save(tmp_path, file, _bfl_lora(), metadata), variant=variant)
    assert pipe.config.name == expected and pipe.config == from_name(expected)
    assert pipe.defaults == {"steps": 50, "guidance": guidance, "sampler": "euler"}
    out = pipe("x", control_image=_image(seed=1), num_inference_steps=1, seed=0, output_type="latent")
    assert out.settings["guidance_scale"] == guidance and out.settings["model"] == expected


def test_an_unnamed_control_lora_is_canny_with_a_warning(load, tmp_path):
    pipe = load("flux-tiny-dev")
    with pytest.warns(UserWarning, match="Canny or Depth"):
        pipe.load_lora(_save(tmp_path, "control.safetensors", _bfl_lora()))
    assert pipe.config.name == "flux-tiny-canny"


def test_refusals_are_typed_and_change_nothing(load, tmp_path):
    pipe = load("flux-tiny-dev")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    canny = _save(tmp_path, "flux1-canny-dev-lora.safetensors", _bfl_lora())
    plain = {"transformer.context_embedder.lora_A.weight": torch.randn(2, 48) * 0.1,
             "transformer.context_embedder.lora_B.weight": torch.randn(64, 2) * 0.1}  # fmt: skip
    with pytest.raises(errors.InputError, match="variant= must be one of"):
        pipe.load_lora(canny, variant="flux-fill-dev")
    with pytest.raises(errors.InputError, match="variant= is for FLUX.1 Canny / Depth LoRAs"):
        pipe.load_lora(_save(tmp_path, "plain.safetensors", plain), variant="canny")
    with pytest.raises(errors.LoraError, match="img_in's lora_A is 192 wide"):
        pipe.load_lora(_save(tmp_path, "wide.safetensors", _bfl_lora(width=192)))
    bad = _bfl_lora()
    bad["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.ones(5)
    with pytest.raises(errors.LoraError, match="query_norm.scale"):
        pipe.load_lora(_save(tmp_path, "badnorm.safetensors", bad))
    bad["double_blocks.0.img_attn.norm.query_norm.scale"] = torch.full((32,), float("nan"))
    with pytest.raises(errors.LoraError, match="NaN"):
        pipe.load_lora(_save(tmp_path, "nannorm.safetensors", bad))
    assert pipe.loras == {} and pipe.config.name == "flux-tiny-dev"
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    img_in_lora = {"img_in.lora_A.weight": torch.randn(2, 64) * 0.1, "img_in.lora_B.weight": torch.randn(64, 2) * 0.1}
    pipe.load_lora(_save(tmp_path, "first.safetensors", img_in_lora), name="first")
    with pytest.raises(errors.LoraError, match="'first' targets img_in"):
        pipe.load_lora(canny)
    pipe.unload_lora("first")
    pipe.load_lora(canny, name="canny")
    with pytest.raises(errors.LoraError, match="already loaded"):
        pipe.load_lora(_save(tmp_path, "flux1-depth-dev-lora.safetensors", _bfl_lora(1)))
    pipe.load_lora(_save(tmp_path, "after.safetensors", img_in_lora), name="after")  # zero-padded
    with pytest.raises(errors.InputError, match="unload 'after' first"):
        pipe.unload_lora("canny")
    pipe.unload_lora()  # all at once: "after" first, then the control LoRA
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())

    class Quantized(torch.nn.Linear):  # stands for an FP8 / int8 img_in (the default skip groups keep it)
        pass

    pipe.transformer.img_in.__class__ = Quantized
    with pytest.raises(errors.LoraError, match="img_in is quantized"):
        pipe.load_lora(canny)
    for variant in ("flux-tiny-schnell", "flux-tiny-kontext"):
        with pytest.raises(errors.LoraError, match="is for FLUX.1 dev"):
            load(variant).load_lora(canny)


def test_the_published_files_map_onto_flux_dev():
    """The full-size list (tests/data/flux_control_lora_key_shapes.json, from BFL's code) on a meta
    FLUX.1 dev: every key is used, every linear layer gets its full rows (q / k / v and the MLP
    of fused layers included) with rank min(128, in, out) and a bias, img_in reads 128 inputs, every QK-norm
    scale is replaced; the same for diffusers' names of it (diffusers' own converter, on meta)."""
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    shapes = KEYS["flux-canny-dev-lora"]
    with torch.device("meta"):
        model = Flux(from_name("flux-dev"))
    meta = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    diffusers_shapes = {k: tuple(v.shape) for k, v in _convert_bfl_flux_control_lora_to_diffusers(meta).items()}
    layers = linear_layers(model)
    norms = [n for n, _ in model.named_parameters() if n.endswith(control_lora.NORMS)]
    for layout in (shapes, diffusers_shapes):
        state = {k: torch.zeros(()).expand(v) for k, v in layout.items()}  # no memory: values are not read
        parts = control_lora.split(state, model, "flux1-canny-dev-lora.safetensors")
        assert parts.width == 128 and parts.narrow == 64 and sorted(parts.norms) == sorted(norms)
        targets, unmatched = parse(state, model, "flux1-canny-dev-lora.safetensors", {"img_in": (128, 64)})
        assert unmatched == [] and sorted(targets) == sorted(layers)
        for name, pieces in targets.items():
            out, inp = layers[name].weight.shape
            rows = sorted((p.row, p.row + p.up.shape[0]) for p in pieces)
            assert (
                rows[0][0] == 0
                and rows[-1][1] == out
                and all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
            ), name
            inp = 128 if name == "img_in" else inp
            assert {p.down.shape[1] for p in pieces} == {inp}, name
            rank = min(128, inp, out)  # BFL's LinearLora caps the rank (final_layer.linear: 64)
            assert all(p.down.shape[0] == rank and p.bias is not None and p.scale == 1.0 for p in pieces), name


def test_cli_generate_with_a_control_lora(pipeline_folders, tmp_path):
    """``fastflow generate --model DEV --lora flux1-depth-dev-lora.safetensors --control-image IMG``
    (a subprocess, as a user runs it): dev becomes Depth, the output takes the control image's size."""
    import subprocess
    import sys

    from PIL import Image

    lora = _save(tmp_path, "flux1-depth-dev-lora.safetensors", _bfl_lora())
    fastflow.canny(_image(48, 32, seed=4)).save(tmp_path / "edges.png")
    args = [sys.executable, "-m", "fastflow", "generate", "a house", "-o", tmp_path / "out.png", "--model",
            pipeline_folders["flux-tiny-dev"], "--lora", lora, "--steps", "1", "--seed", "1", "--no-progress",
            "--control-image", tmp_path / "edges.png"]  # fmt: skip
    done = subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "flux-tiny-depth" in done.stdout + done.stderr
    with Image.open(tmp_path / "out.png") as image:
        assert image.size[0] / image.size[1] == 48 / 32
