"""Shared fixtures: tiny random-weight models built with diffusers' own classes (the reference).

TRITON_INTERPRET is set first, before anything imports triton (its @jit decorators read it once):
the kernel tests run Triton kernels on CPU tensors under the interpreter. On a GPU machine run
``TRITON_INTERPRET=0 pytest`` to test the compiled kernels instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from fastflow.models.configs import from_name
from fastflow.models.text import word_level_tokenizer


@pytest.fixture(scope="session", autouse=True)
def float32_cpu_default():
    """The suite's numbers do not depend on the CPU that runs it: in-process, ``fastflow.load``'s CPU
    default is pinned to float32 (as on a CPU without native bf16), so a parity test that leaves
    dtype= out compares float32 with float32 everywhere. The tests of the rule itself
    (tests/test_cpu_dtype.py) monkeypatch ``capability.cpu_bf16`` over this pin."""
    from fastflow.ops import capability

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capability, "cpu_bf16", lambda: None)
        yield


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    is_sm90 = has_cuda and torch.cuda.get_device_capability() >= (9, 0)
    for item in items:
        if "requires_cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "requires_sm90" in item.keywords and not is_sm90:
            item.add_marker(pytest.mark.skip(reason="needs an sm_90 GPU"))


def perturbed(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved by scale * N(0, 1): zero-initialised gates and
    projections would otherwise hide most of a block from a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def tiny_diffusers_flux(variant: str = "flux-tiny-dev", seed: int = 0, **changes):
    """diffusers FluxTransformer2DModel of a tiny registered config (with ``changes`` to its fields,
    e.g. another depth), every weight random.

    Norm scales are drawn around 1 and everything else around 0, so that no parameter keeps its
    default init (a swapped or dropped tensor must change the output).
    """
    from diffusers import FluxTransformer2DModel

    cfg = from_name(variant).replace(**changes)
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,  # FLUX.1 Fill / Canny / Depth: img_in wider than proj_out
        num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def diffusers_sdxl_modules(folder) -> dict:
    """The diffusers / transformers modules of a tiny SDXL pipeline folder (VAE, both text encoders and
    tokenizers, UNet): the keyword arguments every SDXL pipeline class takes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

    return dict(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
        tokenizer_2=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
    )


def tiny_diffusers_sd3(variant: str = "sd3-tiny-medium", seed: int = 0):
    """diffusers SD3Transformer2DModel of a tiny registered MMDiT config, every weight random,
    including the stored pos_embed (so that loading it, not recomputing it, is what is tested)."""
    from diffusers import SD3Transformer2DModel

    cfg = from_name(variant)
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=2 * cfg.pos_embed_max_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.in_channels,
        num_layers=cfg.depth,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim,
        caption_projection_dim=cfg.hidden_size,
        pooled_projection_dim=cfg.adm_in_dim,
        out_channels=cfg.out_channels,
        pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.dual_attention_layers,
        qk_norm="rms_norm" if cfg.qk_norm else None,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = ".norm_" in name and name.endswith(".weight") and p.ndim == 1
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if is_norm_scale else 0.1 * torch.randn_like(p))
        model.pos_embed.pos_embed.copy_(torch.randn_like(model.pos_embed.pos_embed))
    return model


def tiny_diffusers_vae(variant: str = "vae-tiny-flux", seed: int = 0):
    """diffusers AutoencoderKL of a tiny registered VAE config (REFERENCE.md 5.5), random weights."""
    from diffusers import AutoencoderKL

    cfg = from_name(variant)
    torch.manual_seed(seed)
    n = len(cfg.ch_mult)
    model = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels,
        norm_num_groups=32,
        scaling_factor=cfg.scale_factor,
        shift_factor=cfg.shift_factor,
        use_quant_conv=cfg.quant_conv,
        use_post_quant_conv=cfg.quant_conv,
        force_upcast=cfg.force_upcast,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name and p.ndim == 1
            if is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif not is_norm:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))  # keep diffusers' init scale, perturbed
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def diffusers_unet_config(cfg) -> dict:
    """diffusers UNet2DConditionModel arguments of one of our UNetConfigs (SDXL style)."""
    assert cfg.transformer_depth[-1] == cfg.transformer_depth_middle, "diffusers: mid depth = last level's"
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    attn = [d > 0 for d in cfg.transformer_depth]
    return {
        "sample_size": 32,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        # (levels without attention ignore theirs; the mid block takes the last level's)
        "transformer_layers_per_block": tuple(max(d, 1) for d in cfg.transformer_depth),
        "attention_head_dim": tuple(w // cfg.head_dim for w in widths),  # diffusers' name for heads
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": cfg.time_id_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "norm_num_groups": 32,
    }


def tiny_diffusers_unet(variant: str = "sdxl-tiny", seed: int = 0, **changes):
    """diffusers UNet2DConditionModel of a tiny registered SDXL config (``changes``: other fields),
    every weight random (norm scales around 1, the rest perturbed around diffusers' init, and the
    zero-initialised output convs made non-zero)."""
    from diffusers import UNet2DConditionModel

    cfg = from_name(variant).replace(**changes)
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**diffusers_unet_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p) + 0.5 * p)
    return model


# -- tiny text encoders and tokenizers (word-level, CLIP- and T5-style special tokens) --------------

WORDS = ["a", "handwritten", "seven", "the", "digit", "3", "number", "nine", "cat", "on", "mat"]


def clip_tokenizer(pad_zero: bool):
    """CLIP-style: <|startoftext|> ... <|endoftext|>; CLIP-L pads with EOS, CLIP-G with id 0 ("!")."""
    return word_level_tokenizer(WORDS, "clip", pad_zero)


def t5_tokenizer():
    return word_level_tokenizer(WORDS, "t5")


def tiny_clip(width, projection, seed, projection_dim=None, act="quick_gelu"):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim or width + 8,
        hidden_act=act,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_t5(d_model, seed):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=48,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def tiny_pipeline_folder(root, variant: str, seed: int = 0):
    """A diffusers-layout pipeline folder of a tiny registered transformer variant, with a tiny VAE,
    text encoders and tokenizers, all random. Returns the folder."""
    cfg = from_name(variant)
    root.mkdir(parents=True, exist_ok=True)
    if cfg.family == "flux":
        tiny_diffusers_flux(variant, seed).save_pretrained(root / "transformer")
        tiny_diffusers_vae("vae-tiny-flux", seed + 1).save_pretrained(root / "vae")
        parts = {
            "text_encoder": (tiny_clip(cfg.vec_in_dim, False, seed + 2), clip_tokenizer(False)),
            "text_encoder_2": (tiny_t5(cfg.context_in_dim, seed + 3), t5_tokenizer()),
        }
        pipeline_class = "FluxKontextPipeline" if cfg.kontext else "FluxPipeline"
    elif cfg.family == "sdxl":
        tiny_diffusers_unet(variant, seed).save_pretrained(root / "unet")
        tiny_diffusers_vae("vae-tiny-sdxl", seed + 1).save_pretrained(root / "vae")
        w_l = cfg.context_dim // 2
        parts = {
            "text_encoder": (tiny_clip(w_l, False, seed + 2), word_level_tokenizer(WORDS, "clip", False, 77)),
            "text_encoder_2": (
                tiny_clip(cfg.context_dim - w_l, True, seed + 3, cfg.pooled_dim, act="gelu"),
                word_level_tokenizer(WORDS, "clip", True, 77),
            ),
        }
        pipeline_class = "StableDiffusionXLPipeline"
        diffusers_sdxl_scheduler(cfg).save_pretrained(root / "scheduler")
    else:
        tiny_diffusers_sd3(variant, seed).save_pretrained(root / "transformer")
        tiny_diffusers_vae("vae-tiny-sd3", seed + 1).save_pretrained(root / "vae")
        l_proj = cfg.adm_in_dim // 2
        parts = {
            "text_encoder": (tiny_clip(16, True, seed + 2, l_proj), clip_tokenizer(False)),
            "text_encoder_2": (tiny_clip(24, True, seed + 3, cfg.adm_in_dim - l_proj), clip_tokenizer(True)),
            "text_encoder_3": (tiny_t5(cfg.context_in_dim, seed + 4), t5_tokenizer()),
        }
        pipeline_class = "StableDiffusion3Pipeline"
    for i, (name, (model, tok)) in enumerate(parts.items()):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return root


def diffusers_sdxl_scheduler(cfg, ancestral: bool | None = None):
    """diffusers' SDXL scheduler: Euler with "leading" spacing (base) or Euler ancestral with
    "trailing" (Turbo), the scaled-linear schedule."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    ancestral = cfg.turbo if ancestral is None else ancestral
    cls = EulerAncestralDiscreteScheduler if ancestral else EulerDiscreteScheduler
    return cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing=cfg.spacing,
        prediction_type="epsilon",
    )


def diffusers_flux_scheduler(dynamic: bool = True):
    """diffusers' FLUX scheduler config: dev / Kontext (dynamic shift) or schnell (none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not dynamic:
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift=3.0,
    )


def counting_backend():
    """(backend, reports): a torch.compile backend that runs fastflow's graph rewrites (the front
    half of the fastflow backend) and records each compile's rewrite report, so a test can count
    compiles; dynamo's guards decide recompiles, not inductor."""
    import fastflow.compile as fc

    reports = []

    def backend(gm, example_inputs):
        reports.append(fc.rewrite(gm, example_inputs))
        return gm.forward

    return backend, reports


SVD_SCHEDULER_CONFIG = {  # stabilityai/stable-video-diffusion-img2vid*/scheduler/scheduler_config.json
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "sigma_max": 700.0, "sigma_min": 0.002,
    "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous", "use_karras_sigmas": True,
}  # fmt: skip


def tiny_svd_folder(root, num_frames: int | None = None, seed: int = 0):
    """A diffusers StableVideoDiffusionPipeline folder of the svd-tiny configs (fastflow.loading.svd's
    "svd-tiny" variant: UNet svd-tiny, VAE svd-vae-tiny, TINY_IMAGE_ENCODER), every weight random,
    written by diffusers' / transformers' own classes (save_pretrained). ``num_frames``: the UNet
    config's (svd-tiny's 3 by default). Returns the folder."""
    import dataclasses

    from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
    from transformers import CLIPImageProcessor
    from transformers import CLIPVisionConfig as HFVisionConfig
    from transformers import CLIPVisionModelWithProjection as HFVisionModel

    from fastflow.loading.svd import TINY_IMAGE_ENCODER

    from .models.test_clip_vision import _randomize as randomize_clip
    from .models.test_unet_video import tiny_diffusers_svd_unet
    from .models.test_vae_video import _tiny_diffusers as tiny_diffusers_svd_vae

    cfg = from_name("svd-tiny")
    cfg = cfg if num_frames is None else cfg.replace(num_frames=num_frames)
    encoder = HFVisionModel(HFVisionConfig(**dataclasses.asdict(TINY_IMAGE_ENCODER), attention_dropout=0.0))
    pipe = StableVideoDiffusionPipeline(
        vae=tiny_diffusers_svd_vae(seed + 1),
        image_encoder=randomize_clip(encoder, seed + 2),
        unet=tiny_diffusers_svd_unet(cfg, seed),
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER_CONFIG),
        feature_extractor=CLIPImageProcessor(),
    )
    pipe.save_pretrained(root)
    return root
