"""SDXL LoRA against diffusers / PEFT on a tiny random UNet: a random PEFT adapter on diffusers'
UNet2DConditionModel, saved as diffusers / PEFT, kohya (official ldm names) and kohya (diffusers
names) files, loaded by fastflow; UNet outputs agree to 1e-5 (fp32), fused and unfused. Plus
diffusers' older attention-processor names, scales and several adapters switched under
torch.compile (fullgraph) without recompiling, FP8 layers, exact unfuse. The pipeline and the
refused files: test_lora_sdxl_pipeline.py."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow import errors
from fastflow.adapters import LoraManager
from fastflow.adapters.formats import linear_layers
from fastflow.loading.keymaps import unet_from_diffusers

from ..conftest import counting_backend, tiny_diffusers_unet

peft = pytest.importorskip("peft")

RANK, ALPHA = 4, 8.0
# every linear kind of the SDXL UNet: attention, projections, feed-forward, ResNet time embedding, embeddings
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "time_emb_proj",
           "time_embedding.linear_1", "add_embedding.linear_2"]  # fmt: skip


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers UNet, its folder, our config)."""
    ref = tiny_diffusers_unet("sdxl-tiny", seed=5)
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder / "unet")
    return ref, folder / "unet", fastflow.models.configs.from_name("sdxl-tiny")


def _ours(base):
    return fastflow.load_transformer(base[1], config=base[2], dtype=torch.float32)


def _peft(ref, alpha=ALPHA, seed=1, name="default"):
    """A copy of diffusers' UNet with a random PEFT LoRA (PEFT's random init, B non-zero) on TARGETS; its state dict in
    diffusers module names (``down_blocks.1.attentions.0...to_q.lora_A.weight``)."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(ref)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False), name)
    return model, get_peft_model_state_dict(model, adapter_name=name)


def _inputs(cfg, batch=2, h=16, w=16, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, cfg.in_channels, h, w, generator=g), t=torch.tensor([999.0, 300.0][:batch]),
                ctx=torch.randn(batch, tokens, cfg.context_dim, generator=g),
                pooled=torch.randn(batch, cfg.pooled_dim, generator=g),
                ids=torch.tensor([[64.0, 64, 0, 0, 64, 64], [32, 48, 0, 8, 64, 64]][:batch]))  # fmt: skip


def _run_theirs(model, i):
    with torch.no_grad():
        cond = {"text_embeds": i["pooled"], "time_ids": i["ids"]}
        return model(i["x"], i["t"], i["ctx"], added_cond_kwargs=cond).sample


def _run_ours(model, i):
    with torch.no_grad():
        return model(i["x"], i["t"], i["ctx"], i["pooled"], i["ids"])


def _official_names(cfg, model) -> dict[str, str]:
    """diffusers module -> our (official) module, for every linear layer of ours."""
    out = {}
    for name in linear_layers(model):
        (seg,) = unet_from_diffusers(f"{name}.weight", cfg)
        out[seg.key.removesuffix(".weight")] = name
    return out


def _file(tmp_path, name, state, form, alpha=ALPHA, official=None):
    """Save a PEFT state dict as ``form``: diffusers (``unet.`` prefix, no alpha: diffusers' own
    files carry alpha = rank), kohya on official names, kohya on diffusers names (both with alpha)."""
    if form == "diffusers-metadata":  # diffusers' own writer: PEFT's config (lora_alpha) in the header
        from diffusers import StableDiffusionXLPipeline

        config = {"r": RANK, "lora_alpha": alpha, "target_modules": TARGETS}
        StableDiffusionXLPipeline.save_lora_weights(
            tmp_path / name, unet_lora_layers=state, unet_lora_adapter_metadata=config
        )
        return tmp_path / name / "pytorch_lora_weights.safetensors"
    out = {}
    for key, v in state.items():
        module, _, role = key.rpartition(".lora_")
        half = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[role]
        if form == "diffusers":
            out[f"unet.{key}"] = v
            continue
        mod = official[module] if form == "kohya" else module
        kohya = "lora_unet_" + mod.replace(".", "_")
        out[f"{kohya}.{half}"] = v
        out[f"{kohya}.alpha"] = torch.tensor(alpha)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


@pytest.mark.parametrize("form", ["diffusers", "diffusers-metadata", "kohya", "kohya-diffusers"])
def test_unet_formats_equal_peft_fused_and_unfused(base, tmp_path, form):
    ref, _, cfg = base
    alpha = float(RANK) if form == "diffusers" else ALPHA  # diffusers' files without metadata: scale 1
    theirs_model, state = _peft(ref, alpha=alpha)
    i = _inputs(cfg)
    expected, plain_theirs = _run_theirs(theirs_model, i), _run_theirs(ref, i)
    model = _ours(base)
    plain = _run_ours(model, i)
    assert _rel(plain, plain_theirs) <= 1e-5
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    path = _file(tmp_path, "style", state, form, alpha, _official_names(cfg, model))
    manager = LoraManager(model)
    adapter = manager.load(path, text_encoder="refuse")
    assert adapter.unmatched == [] and len(adapter.targets) == len(state) // 2
    assert _rel(_run_ours(model, i), expected) <= 1e-5 and _rel(plain, expected) > 1e-2  # it matters, and matches
    manager.set_fused(True)
    assert not torch.equal(
        model.state_dict()["input_blocks.4.1.proj_in.weight"], weights["input_blocks.4.1.proj_in.weight"]
    )
    assert _rel(_run_ours(model, i), expected) <= 1e-5
    manager.set_fused(False)
    manager.unload()
    after = model.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert torch.equal(_run_ours(model, i), plain)


def test_legacy_attention_processor_names(base, tmp_path):
    """diffusers' older LoRAAttnProcessor files: ``attn1.processor.to_q_lora.down.weight``."""
    ref, _, cfg = base
    _, state = _peft(ref, alpha=float(RANK), seed=2)
    state = {k: v for k, v in state.items() if ".attn" in k}
    legacy = {}
    for key, v in state.items():
        module, _, role = key.rpartition(".lora_")
        parent, _, proj = module.rpartition(".")
        parent = parent.removesuffix(".to_out")
        proj = "to_out" if proj == "0" else proj
        legacy[f"{parent}.processor.{proj}_lora.{'down' if role == 'A.weight' else 'up'}.weight"] = v
    model = _ours(base)
    path = tmp_path / "legacy.safetensors"
    save_file(legacy, str(path))
    manager = LoraManager(model)
    adapter = manager.load(path)
    assert adapter.unmatched == [] and len(adapter.targets) == len(legacy) // 2
    full = LoraManager(_ours(base))
    full.load(_file(tmp_path, "d", state, "diffusers"))
    i = _inputs(cfg)
    assert torch.equal(_run_ours(model, i), _run_ours(full.model, i))


def test_scales_and_adapters_switch_without_recompiling(base, tmp_path):
    ref, _, cfg = base
    model = _ours(base)
    official = _official_names(cfg, model)
    i = _inputs(cfg, batch=1)
    ma, sa = _peft(ref, seed=3, name="a")
    mb, sb = _peft(ref, seed=4, name="b")
    manager = LoraManager(model)
    manager.load(_file(tmp_path, "a", sa, "kohya", official=official))
    manager.load(_file(tmp_path, "b", sb, "kohya-diffusers"), scale=0.0)
    assert _rel(_run_ours(model, i), _run_theirs(ma, i)) <= 1e-5
    manager.set_scales({"a": 0.0, "b": 1.0})
    assert _rel(_run_ours(model, i), _run_theirs(mb, i)) <= 1e-5
    eager = {}
    for scales in ({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.5, "b": -0.5}):
        manager.set_scales(scales)
        eager[tuple(scales.values())] = _run_ours(model, i)
    counting, compiles = counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting, fullgraph=True)
    try:
        for scales in ({"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}, {"a": 0.5, "b": -0.5}):
            manager.set_scales(scales)
            assert _rel(_run_ours(compiled, i), eager[tuple(scales.values())]) <= 1e-5
    finally:
        torch._dynamo.reset()
    assert len(compiles) == 1, f"{len(compiles)} compiles while switching LoRA scales"


def test_fp8_layers_unfused_and_fused_then_restored_exactly(base, tmp_path):
    from fastflow.quant import quantize_

    ref, _, cfg = base
    model = quantize_(_ours(base))
    layer = model.input_blocks[4][1].transformer_blocks[0].attn1.to_q
    assert hasattr(layer, "weight_scale")
    codes, scales = layer.weight.clone(), layer.weight_scale.clone()
    theirs_model, state = _peft(ref, seed=5)
    i = _inputs(cfg, batch=1)
    plain = _run_ours(model, i)
    manager = LoraManager(model)
    manager.load(_file(tmp_path, "s", state, "kohya", official=_official_names(cfg, model)))
    unfused = _run_ours(model, i)
    # the LoRA matters, and FP8 moves the output less than it (tiny random UNets are FP8-sensitive)
    assert _rel(unfused, _run_theirs(theirs_model, i)) < 0.5 * _rel(plain, unfused)
    manager.set_fused(True)
    assert layer.weight.dtype == codes.dtype and not torch.equal(layer.weight, codes)  # re-quantized in place
    from fastflow.quant.fp8 import dequantize_weight

    adapter = manager.adapters["s"]
    (piece,) = adapter.targets["input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
    want = dequantize_weight(codes, scales, torch.float32) + piece.scale * piece.up @ piece.down
    got = dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    assert _rel(got, want) < 0.05  # the fused weight: base + delta, up to one FP8 rounding
    fp32_plain = _run_ours(_ours(base), i)
    assert _rel(_run_ours(model, i), unfused) < 3 * _rel(plain, fp32_plain)  # re-rounding moves it like FP8 does
    manager.unload()
    assert torch.equal(layer.weight, codes) and torch.equal(layer.weight_scale, scales)
    assert torch.equal(_run_ours(model, i), plain)


def test_metadata_with_per_module_patterns_is_refused(base, tmp_path):
    _, state = _peft(base[0], seed=6)
    path = tmp_path / "p.safetensors"
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q": 16}}
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(meta)})  # fmt: skip
    manager = LoraManager(_ours(base))
    with pytest.raises(errors.LoraError, match="per-module alpha_pattern"):
        manager.load(path)
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, str(path),
              metadata={"lora_adapter_metadata": "{not json"})  # fmt: skip
    with pytest.raises(errors.LoraError, match="not JSON"):
        manager.load(path)
    assert manager.adapters == {}
