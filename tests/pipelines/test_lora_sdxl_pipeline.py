"""SDXL LoRA through the pipeline: ``pipe.load_lora`` equals diffusers' ``load_lora_weights`` on
the tiny SDXL pipeline (final latents, fp32, fused and unfused), text-encoder keys refused unless
``unet_only=True``, and the files fastflow refuses: another family, shapes of another model, keys
that match nothing, LoCon / LoHa / LoKr / DoRA, each a typed error with nothing half-loaded."""

import pytest
import torch
from safetensors.torch import save_file

from fastflow import errors

from .test_sdxl import H, W, _gens, _rel, diffusers_sdxl

pytest.importorskip("peft")

RANK = 4
MODULES = [  # diffusers names on sdxl-tiny (level 1 holds the transformers), and the embeddings
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "down_blocks.1.attentions.1.proj_in", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_out.0", "up_blocks.0.resnets.1.time_emb_proj",
    "time_embedding.linear_2",
]  # fmt: skip


def _lora(unet, seed, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        layer = unet.get_submodule(name)
        state[f"unet.{name}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.3
        state[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.3
    return state


def _save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_equals_diffusers_load_lora_weights(pipeline_folders, load, tmp_path, fuse):
    ref = diffusers_sdxl(pipeline_folders["sdxl-tiny"], "sdxl-tiny")
    pipe = load("sdxl-tiny")
    kw = dict(height=H, width=W, num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    prompts = ["a handwritten seven"]
    plain = pipe(prompts, generator=_gens([3]), **kw).images
    path = _save(tmp_path, "style", _lora(ref.unet, 1))
    ref.load_lora_weights(path)
    expected = ref(prompts, generator=_gens([3]), **kw).images
    assert pipe.load_lora(path, fuse=fuse) == "style"
    assert pipe.loras["style"]["layers"] == len(MODULES)
    assert _rel(pipe(prompts, generator=_gens([3]), **kw).images, expected) <= 1e-5 and _rel(plain, expected) > 1e-3
    pipe.set_lora_scales(style=0.0)
    if not fuse:
        assert torch.equal(pipe(prompts, generator=_gens([3]), **kw).images, plain)  # scale 0 is no LoRA
    pipe.unload_lora()
    assert torch.equal(pipe(prompts, generator=_gens([3]), **kw).images, plain)


def test_text_encoder_keys_are_refused_unless_unet_only(load, pipeline_folders, tmp_path):
    ref = diffusers_sdxl(pipeline_folders["sdxl-tiny"], "sdxl-tiny")
    pipe = load("sdxl-tiny")
    state = _lora(ref.unet, 2)
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(RANK, 8),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(8, RANK),
          "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(RANK, 8),
          "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(8, RANK)}  # fmt: skip
    path = _save(tmp_path, "both", {**state, **te})
    with pytest.raises(errors.LoraError, match=r"4 key\(s\).*text encoders.*lora_te1_.*unet_only=True"):
        pipe.load_lora(path)
    assert pipe.loras == {}
    with pytest.warns(UserWarning, match=r"4 LoRA key\(s\) match no layer.*text-encoder"):
        name = pipe.load_lora(path, unet_only=True)
    assert len(pipe.loras[name]["unmatched"]) == 4 and pipe.loras[name]["layers"] == len(MODULES)
    with pytest.raises(errors.LoraError, match="text-encoder keys only"):
        pipe.load_lora(_save(tmp_path, "te", te), unet_only=True)
    with pytest.raises(errors.InputError, match="unet_only"):
        pipe.load_lora(path, name="x", unet_only="yes")


KIND_KEYS = {
    "LoCon": ("lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight", torch.zeros(RANK, 32, 3, 3)),
    "LoHa": ("lora_unet_input_blocks_4_1_proj_in.hada_w1_a", torch.zeros(64, RANK)),
    "LoKr": ("lora_unet_input_blocks_4_1_proj_in.lokr_w1", torch.zeros(8, 8)),
    "DoRA": ("lora_unet_input_blocks_4_1_proj_in.dora_scale", torch.zeros(1, 64)),
    "DoRA-peft": ("unet.down_blocks.1.attentions.0.proj_in.lora_magnitude_vector", torch.zeros(64)),
}


@pytest.mark.parametrize("kind", list(KIND_KEYS))
def test_other_lora_kinds_are_refused_naming_kind_and_key(load, pipeline_folders, tmp_path, kind):
    ref = diffusers_sdxl(pipeline_folders["sdxl-tiny"], "sdxl-tiny") if kind == "LoCon" else None
    pipe = load("sdxl-tiny")
    key, tensor = KIND_KEYS[kind]
    state = {key: tensor}
    if ref is not None:
        state = {**_lora(ref.unet, 3), key: tensor, key.replace("down", "up"): torch.zeros(32, RANK, 1, 1)}
    with pytest.raises(errors.LoraError, match=rf"{kind.removesuffix('-peft')}.*{key}"):
        pipe.load_lora(_save(tmp_path, "kind", state))
    assert pipe.loras == {}


def test_bad_files_are_typed_errors(load, pipeline_folders, tmp_path):
    pipe = load("sdxl-tiny")
    ref = diffusers_sdxl(pipeline_folders["sdxl-tiny"], "sdxl-tiny")
    good = _lora(ref.unet, 4, MODULES[:2])
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, RANK)}  # fmt: skip
    with pytest.raises(errors.FamilyMismatchError, match="for FLUX but the model is SDXL"):
        pipe.load_lora(_save(tmp_path, "flux", flux))
    wide = dict(good)  # an SDXL-sized LoRA on the tiny UNet (or an SD1.5 one on SDXL)
    wide["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 640)
    with pytest.raises(errors.LoraError, match=r"attn1\.to_q.*does not fit the layer.*input_blocks\.4\.1"):
        pipe.load_lora(_save(tmp_path, "wide", wide))
    nothing = {"lora_unet_foo_bar.lora_down.weight": torch.zeros(RANK, 8),
               "lora_unet_foo_bar.lora_up.weight": torch.zeros(8, RANK)}  # fmt: skip
    with pytest.raises(errors.LoraError, match="no key of this LoRA names a layer of sdxl-tiny"):
        pipe.load_lora(_save(tmp_path, "nothing", nothing))
    assert pipe.loras == {}
    with pytest.warns(UserWarning, match=r"2 LoRA key\(s\) match no layer.*lora_unet_foo_bar"):
        pipe.load_lora(_save(tmp_path, "some", {**good, **nothing}))
    # an SDXL LoRA on FLUX says what it is
    flux_pipe = load("flux-tiny-schnell")
    with pytest.raises(errors.FamilyMismatchError, match="for SDXL but the model is FLUX"):
        flux_pipe.load_lora(_save(tmp_path, "sdxl", good))
