"""LoRA against diffusers' ``load_lora_weights`` (PEFT) on tiny random FLUX and SD3 pipelines: the
same base folders, the same LoRA, the same noise; final latents agree to 1e-5 (fp32), fused and
unfused. Formats: diffusers / PEFT, kohya (official names, fused q/k/v with alpha), XLabs. Plus
exact unfuse, scale 0, switching without recompiling, FP8 layers, the CLI and the errors."""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from fastflow import errors
from fastflow.cli import main
from fastflow.models.flux import pack_latents, unpack_latents

from ..conftest import counting_backend
from .test_parity import SD3_W, H, W, _rel, diffusers_flux, diffusers_sd3

pytest.importorskip("peft")  # diffusers' load_lora_weights runs through PEFT

RANK = 4
FLUX_MODULES = [  # diffusers names: q / k / v of both streams (fused qkv in ours), MLPs, single blocks, norms
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_out.0",
    "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2", "transformer_blocks.0.norm1.linear",
    "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_v",
    "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out", "norm_out.linear",
]  # fmt: skip
SD3_MODULES = [
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.ff.net.2",
    "transformer_blocks.0.ff_context.net.0.proj",
    "transformer_blocks.1.norm1_context.linear",  # the last (pre-only) block: (scale, shift) halves swapped in SAI's
]  # fmt: skip


def _diffusers_lora(transformer, modules, seed):
    """A random diffusers / PEFT-format LoRA (lora_A [r, in], lora_B [out, r]) on ``modules``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        layer = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.2
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.2
    return state


def _save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _flux_setup(pipeline_folders, load, variant="flux-tiny-dev"):
    pipe = load(variant)
    ref = diffusers_flux(pipeline_folders[variant], dynamic=True)
    txt, y = pipe.text_encoder(["a handwritten seven"])
    noise = torch.randn(1, 16, H // 2, W // 2, generator=torch.Generator().manual_seed(0))
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "height": H, "width": W, "num_inference_steps": 3,
          "guidance_scale": 3.5, "output_type": "latent"}  # fmt: skip

    def ours():
        return pipe(latents=noise, **kw).images

    def theirs():
        return unpack_latents(ref(latents=pack_latents(noise), **kw).images, H // 2, W // 2)

    return pipe, ref, ours, theirs


def test_flux_diffusers_format_equals_diffusers_fused_and_unfused(pipeline_folders, load, tmp_path):
    pipe, ref, ours, theirs = _flux_setup(pipeline_folders, load)
    plain = ours()
    path = _save(tmp_path, "style", _diffusers_lora(ref.transformer, FLUX_MODULES, 1))
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    ref.load_lora_weights(path)
    expected = theirs()
    assert pipe.load_lora(path) == "style"
    got = ours()
    assert _rel(got, expected) <= 1e-5 and _rel(plain, expected) > 1e-3  # the LoRA matters, and matches
    pipe.fuse_lora()
    assert _rel(ours(), expected) <= 1e-5
    assert not torch.equal(pipe.transformer.state_dict()["double_blocks.0.img_attn.qkv.weight"],
                           weights["double_blocks.0.img_attn.qkv.weight"])  # fmt: skip
    pipe.unfuse_lora()
    pipe.set_lora_scales(style=0.0)
    torch.testing.assert_close(ours(), plain, rtol=0, atol=0)  # scale 0 is no LoRA
    pipe.unload_lora()
    after = pipe.transformer.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    torch.testing.assert_close(ours(), plain, rtol=0, atol=0)


def _kohya_flux(pipe, seed, alpha):
    """A kohya (sd-scripts) FLUX LoRA on official names: a fused q/k/v as one pair. (Not linear1:
    diffusers' converter splits it with FLUX.1's full-size widths, which a tiny model does not have.)"""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear2",
                 "double_blocks.0.img_mod.lin"):  # fmt: skip
        layer = pipe.transformer.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.2
        state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.2
        state[f"{key}.alpha"] = torch.tensor(float(alpha))
    return state


def test_flux_kohya_format_equals_diffusers(pipeline_folders, load, tmp_path):
    pipe, ref, ours, theirs = _flux_setup(pipeline_folders, load)
    path = _save(tmp_path, "kohya", _kohya_flux(pipe, 2, alpha=2))  # alpha / rank = 0.5
    ref.load_lora_weights(path)
    pipe.load_lora(path, fuse=True)
    expected = theirs()
    assert _rel(ours(), expected) <= 1e-5
    pipe.unfuse_lora()
    assert _rel(ours(), expected) <= 1e-5


def test_xlabs_format_equals_diffusers(pipeline_folders, load, tmp_path):
    pipe, ref, ours, theirs = _flux_setup(pipeline_folders, load)
    g = torch.Generator().manual_seed(3)
    c = pipe.transformer.config.hidden_size
    state = {}
    for key, rows in (
        ("double_blocks.0.processor.qkv_lora1", 3 * c),
        ("double_blocks.0.processor.proj_lora2", c),
        ("single_blocks.1.processor.qkv_lora", 3 * c),
        ("single_blocks.0.processor.proj_lora", c),
    ):
        cols = c if "proj_lora" not in key or "double" in key else pipe.transformer.single_blocks[0].linear2.in_features
        state[f"{key}.down.weight"] = torch.randn(RANK, cols, generator=g) * 0.2
        state[f"{key}.up.weight"] = torch.randn(rows, RANK, generator=g) * 0.2  # fmt: skip
    path = _save(tmp_path, "xlabs", state)
    ref.load_lora_weights(path)
    pipe.load_lora(path)
    assert _rel(ours(), theirs()) <= 1e-5


def _sd3_setup(pipeline_folders, load):
    pipe = load("sd3.5-tiny-medium")
    ref = diffusers_sd3(pipeline_folders["sd3.5-tiny-medium"])
    ctx, pooled = pipe.text_encoder(["a handwritten seven"])
    neg = pipe.text_encoder([""])
    noise = torch.randn(1, 16, H // 2, SD3_W // 2, generator=torch.Generator().manual_seed(2))
    kw = {"prompt_embeds": ctx, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": neg[0],
          "negative_pooled_prompt_embeds": neg[1], "height": H, "width": SD3_W, "num_inference_steps": 4,
          "guidance_scale": 4.5, "output_type": "latent"}  # fmt: skip
    return pipe, ref, lambda: pipe(latents=noise, sampler="euler", **kw).images, lambda: ref(latents=noise, **kw).images


def _to_kohya_sd3(state, pipe):
    """The same LoRA in kohya format on SAI names: a layer's q / k / v pairs become one fused pair
    (down stacked, up block-diagonal), whose product is the same delta."""
    out = {}
    width = pipe.transformer.config.hidden_size
    for key in [k for k in state if k.endswith("lora_A.weight")]:
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        down, up = state[key], state[key.replace("lora_A", "lora_B")]
        m = module.split(".")
        block, attn, name = m[1], m[2], ".".join(m[3:])
        qkv = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
        if attn == "attn" and name in qkv:
            side = "x" if name.startswith("to_") else "context"
            target = f"lora_unet_joint_blocks_{block}_{side}_block_attn_qkv"
            big_up = torch.zeros(3 * width, RANK)
            big_up[qkv[name] * width : (qkv[name] + 1) * width] = up
            if f"{target}.lora_down.weight" in out:  # another of q / k / v: widen the rank
                out[f"{target}.lora_down.weight"] = torch.cat((out[f"{target}.lora_down.weight"], down))
                out[f"{target}.lora_up.weight"] = torch.cat((out[f"{target}.lora_up.weight"], big_up), dim=1)
            else:
                out[f"{target}.lora_down.weight"], out[f"{target}.lora_up.weight"] = down, big_up
            continue
        if f"{attn}.{name}" == "norm1_context.linear":  # SAI order (shift, scale): the up rows' halves swap
            up = torch.cat(up.chunk(2)[::-1])
        sai = {"attn.to_out.0": "x_block_attn_proj", "ff.net.2": "x_block_mlp_fc2",
               "ff_context.net.0.proj": "context_block_mlp_fc1",
               "norm1_context.linear": "context_block_adaLN_modulation_1"}[f"{attn}.{name}"]  # fmt: skip
        out[f"lora_unet_joint_blocks_{block}_{sai}.lora_down.weight"] = down
        out[f"lora_unet_joint_blocks_{block}_{sai}.lora_up.weight"] = up
    return out


@pytest.mark.parametrize("form", ["diffusers", "kohya"])
@pytest.mark.parametrize("fuse", [False, True])
def test_sd3_equals_diffusers(pipeline_folders, load, tmp_path, form, fuse):
    pipe, ref, ours, theirs = _sd3_setup(pipeline_folders, load)
    plain = ours()
    state = _diffusers_lora(ref.transformer, SD3_MODULES, 4)
    ref.load_lora_weights(_save(tmp_path, "d", state))
    expected = theirs()
    path = _save(tmp_path, form, state if form == "diffusers" else _to_kohya_sd3(state, pipe))
    pipe.load_lora(path, fuse=fuse)
    assert _rel(ours(), expected) <= 1e-5 and _rel(plain, expected) > 1e-3
    pipe.unload_lora()
    torch.testing.assert_close(ours(), plain, rtol=0, atol=0)


def test_switching_adapters_does_not_recompile(load, pipeline_folders, tmp_path):
    pipe, ref, ours, _ = _flux_setup(pipeline_folders, load)
    a = pipe.load_lora(_save(tmp_path, "a", _diffusers_lora(ref.transformer, FLUX_MODULES, 5)))
    b = pipe.load_lora(_save(tmp_path, "b", _diffusers_lora(ref.transformer, FLUX_MODULES[:5], 6)), scale=0.0)
    eager = {}
    for scales in ({a: 1.0, b: 0.0}, {a: 0.0, b: 1.0}, {a: 0.5, b: 0.5}):
        pipe.set_lora_scales(scales)
        eager[tuple(scales.values())] = ours()
    counting, compiles = counting_backend()
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend=counting)
    try:
        for scales in ({a: 1.0, b: 0.0}, {a: 0.0, b: 1.0}, {a: 0.5, b: 0.5}):
            pipe.set_lora_scales(scales)
            assert _rel(ours(), eager[tuple(scales.values())]) <= 1e-5
    finally:
        pipe.transformer = pipe.transformer._orig_mod
        torch._dynamo.reset()
    assert len(compiles) == 1, f"{len(compiles)} compiles while switching LoRA scales"


def test_fp8_layers_fuse_by_requantizing_and_unfuse_exactly(load, pipeline_folders, tmp_path):
    from fastflow.quant import quantize_

    pipe = load("flux-tiny-dev")
    quantize_(pipe.transformer)  # Fp8Linear layers (fastflow.load dequantizes on a CPU without FP8 cores)
    ref = diffusers_flux(pipeline_folders["flux-tiny-dev"], dynamic=True)
    layer = pipe.transformer.double_blocks[0].img_attn.qkv
    codes, scales = layer.weight.clone(), layer.weight_scale.clone()
    path = _save(tmp_path, "s", _diffusers_lora(ref.transformer, FLUX_MODULES, 7))
    txt, y = pipe.text_encoder(["a seven"])
    kw = {"prompt_embeds": txt, "pooled_prompt_embeds": y, "height": H, "width": W, "num_inference_steps": 2,
          "seed": 1, "output_type": "latent"}  # fmt: skip
    pipe.load_lora(path)
    unfused = pipe(**kw).images
    pipe.fuse_lora()
    assert layer.weight.dtype == codes.dtype and not torch.equal(layer.weight, codes)  # re-quantized in place
    assert _rel(pipe(**kw).images, unfused) < 0.05  # the same LoRA, up to FP8 rounding of the sum
    pipe.unload_lora()
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scales)


def test_bad_loras_are_typed_errors(load, pipeline_folders, tmp_path):
    pipe = load("flux-tiny-dev")
    ref = diffusers_flux(pipeline_folders["flux-tiny-dev"], dynamic=True)
    good = _diffusers_lora(ref.transformer, FLUX_MODULES[:2], 8)
    # a LoRA for SD3 on FLUX
    sd3 = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 8),
           "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(24, 4)}  # fmt: skip
    with pytest.raises(errors.FamilyMismatchError, match="for SD3 but the model is FLUX"):
        pipe.load_lora(_save(tmp_path, "sd3", sd3))
    # rank mismatch between the halves, naming the key
    bad = dict(good)
    bad["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.zeros(48, RANK + 1)
    with pytest.raises(errors.LoraError, match=r"transformer_blocks\.0\.attn\.to_k.*not a LoRA pair"):
        pipe.load_lora(_save(tmp_path, "rank", bad))
    # made for a wider model
    wide = dict(good)
    wide["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = torch.zeros(RANK, 96)
    with pytest.raises(errors.LoraError, match=r"to_k.*does not fit the layer it names"):
        pipe.load_lora(_save(tmp_path, "wide", wide))
    with pytest.raises(errors.LoraError, match="missing"):
        pipe.load_lora(_save(tmp_path, "half", {k: v for k, v in good.items() if "to_k.lora_B" not in k}))
    with pytest.raises(errors.LoraError, match="no LoRA tensors"):
        pipe.load_lora(_save(tmp_path, "none", {"a.weight": torch.zeros(2, 2)}))
    (tmp_path / "pickled.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.CheckpointError):
        pipe.load_lora(tmp_path / "pickled.bin")
    assert pipe.loras == {}  # nothing half-loaded after the errors
    # keys that match nothing are listed, never silently dropped
    extra = {**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}  # fmt: skip
    with pytest.warns(UserWarning, match=r"2 LoRA key\(s\) match no layer.*text-encoder.*lora_te1_"):
        name = pipe.load_lora(_save(tmp_path, "extra", extra))
    assert len(pipe.loras[name]["unmatched"]) == 2
    with pytest.raises(errors.InputError, match="already loaded"):
        pipe.load_lora(_save(tmp_path, "extra", extra))
    with pytest.raises(errors.InputError, match="no LoRA named 'nope'"):
        pipe.set_lora_scales(nope=1.0)
    with pytest.raises(errors.InputError, match="scale"):
        pipe.set_lora_scales({name: "strong"})


def test_cli_lora_with_scale(tmp_path, capsys, pipeline_folders):
    ref = diffusers_flux(pipeline_folders["flux-tiny-schnell"], dynamic=False)
    path = _save(tmp_path, "style", _diffusers_lora(ref.transformer, FLUX_MODULES, 9))
    argv = ["generate", "a seven", "--model", str(pipeline_folders["flux-tiny-schnell"]), "--steps", "2",
            "--seed", "1", "--no-progress", "-H", str(H), "-W", str(W)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "-o", str(tmp_path / "plain.png")]) == 0
        assert main([*argv, "-o", str(tmp_path / "lora.png"), "--lora", f"{path}:0.7"]) == 0
        assert main([*argv, "-o", str(tmp_path / "zero.png"), "--lora", f"{path}:0"]) == 0
    assert main([*argv, "-o", str(tmp_path / "x.png"), "--lora", f"{tmp_path / 'missing.safetensors'}"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    import numpy as np
    from PIL import Image

    plain, lora, zero = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("plain", "lora", "zero"))
    assert np.array_equal(plain, zero) and not np.array_equal(plain, lora)
    with Image.open(tmp_path / "lora.png") as im:
        assert '"style": 0.7' in im.text["settings"]


def test_bfl_format_on_official_names_equals_kohya(load, tmp_path):
    """BFL's own LoRAs: PEFT keys (lora_A / lora_B) on official module names, also under ComfyUI's
    ``diffusion_model.`` prefix; the same pairs in kohya form give the same images."""
    pipe = load("flux-tiny-dev")
    kohya = _kohya_flux(pipe, 10, alpha=RANK)  # alpha = rank: scale 1, as PEFT files without alpha
    bfl = {}
    for key, value in kohya.items():
        if key.endswith(".alpha"):
            continue
        prefix = key.split(".lora_")[0]
        module = next(n for n, _ in pipe.transformer.named_modules() if "lora_unet_" + n.replace(".", "_") == prefix)
        role = "lora_A" if "lora_down" in key else "lora_B"
        bfl[f"diffusion_model.{module}.{role}.weight"] = value
    kw = {"height": H, "width": W, "num_inference_steps": 2, "seed": 3, "output_type": "latent"}
    pipe.load_lora(_save(tmp_path, "kohya", kohya))
    expected = pipe("a seven", **kw).images
    pipe.unload_lora()
    pipe.load_lora(_save(tmp_path, "bfl", bfl))
    assert pipe.loras["bfl"]["layers"] == 4
    torch.testing.assert_close(pipe("a seven", **kw).images, expected, rtol=0, atol=0)
