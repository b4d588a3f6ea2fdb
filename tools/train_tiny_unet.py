"""The UNet half of tools/train_tiny.py (``--family unet``): the embedded ``fastflow-tiny-digits-unet``.

The SDXL architecture at toy size: fastflow's UNet (the ``fastflow-tiny-digits-unet`` config), SDXL's
two CLIP text encoders (CLIP-L's and OpenCLIP-G's roles: both penultimate states side by side as the
context, the second one's projected pooled output in the added embedding) trained jointly from
scratch with word-level tokenizers, and the VAE of the embedded FLUX model, reused unchanged (its
``vae/`` folder is copied, so the latent scale / shift in its config.json are the ones the UNet is
trained on). Objective: SDXL's, eps prediction on the scaled-linear discrete schedule (1000 steps,
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, t uniform), prompts replaced by the empty prompt 10% of the
time for classifier-free guidance. Sampled by SDXLPipeline (Euler, the config's spacing and defaults).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from train_tiny import P_EMPTY, TEMPLATES, TEXT_TOKENS, JointTrainer, prompts_for, run_training

from fastflow.models import AutoEncoder, from_name
from fastflow.models.unet import UNet
from fastflow.samplers.discrete import TRAIN_STEPS, scaled_linear_alphas_cumprod

NAME = "fastflow-tiny-digits-unet"
CLIP_WIDTH = 32  # each text encoder's width: the context is 2 * 32 = the config's context_dim


def load_vae(folder: Path) -> tuple[AutoEncoder, float, float]:
    """The embedded FLUX model's VAE (weights in float32) and its latent (scale, shift)."""
    from safetensors.torch import load_file

    vae = AutoEncoder(from_name("fastflow-tiny-digits-vae"))
    state = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    factors = json.loads((folder / "vae" / "config.json").read_text())
    return vae.eval(), float(factors["scaling_factor"]), float(factors["shift_factor"])


def build_text_models(clip_tok, g_tok):
    """CLIP-L's and OpenCLIP-G's roles at toy size (transformers' classes, saved with save_pretrained)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config(vocab: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=vocab, hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=TEXT_TOKENS, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, projection_dim=CLIP_WIDTH,
        )  # fmt: skip

    return CLIPTextModel(config(len(clip_tok))), CLIPTextModelWithProjection(config(len(g_tok)))


class UNetTrainer(JointTrainer):
    """eps-prediction training of the UNet jointly with both text encoders."""

    def __init__(self, latents, labels, clip_l, clip_g, clip_tok, g_tok, batch: int, lr: float):
        self.cfg = from_name(NAME)
        self.model = UNet(self.cfg)
        self.clip_l, self.clip_g = clip_l, clip_g
        self.latents, self.labels, self.batch = latents, labels, batch
        flat = [p for d in range(10) for p in prompts_for(d)] + [""]
        kw = {"padding": "max_length", "max_length": TEXT_TOKENS, "truncation": True, "return_tensors": "pt"}
        self.l_ids, self.g_ids = clip_tok(flat, **kw).input_ids, g_tok(flat, **kw).input_ids
        self.per_digit, self.empty = len(TEMPLATES), len(flat) - 1
        side = latents.shape[-1] * 2  # the VAE halves: the image side the pipeline's time ids state
        self.time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
        self.sqrt_abar = scaled_linear_alphas_cumprod().sqrt()
        self.sqrt_one_minus = (1 - scaled_linear_alphas_cumprod()).sqrt()
        self.setup_optimizer(lr)

    def modules(self):
        return [self.model, self.clip_l, self.clip_g]

    def encode(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's conditioning: (both penultimate states side by side, G's projected pooled output)."""
        lo = self.clip_l(self.l_ids[prompt], output_hidden_states=True)
        go = self.clip_g(self.g_ids[prompt], output_hidden_states=True)
        return torch.cat((lo.hidden_states[-2], go.hidden_states[-2]), dim=-1), go.text_embeds

    def step(self, lr: float) -> float:
        self.set_lr(lr)
        b = self.batch
        idx = torch.randint(0, len(self.latents), (b,))
        x0 = self.latents[idx]
        prompt = self.labels[idx] * self.per_digit + torch.randint(0, self.per_digit, (b,))
        prompt = torch.where(torch.rand(b) < P_EMPTY, torch.full_like(prompt, self.empty), prompt)
        context, pooled = self.encode(prompt)
        t = torch.randint(0, TRAIN_STEPS, (b,))
        noise = torch.randn_like(x0)
        xt = self.sqrt_abar[t][:, None, None, None] * x0 + self.sqrt_one_minus[t][:, None, None, None] * noise
        eps = self.model(xt, t.float(), context, pooled, self.time_ids.expand(b, 6))
        return self.optimize(F.mse_loss(eps, noise))


def train_unet(latents, labels, clip_tok, g_tok, steps: int, batch: int, lr: float, log_every: int):
    clip_l, clip_g = build_text_models(clip_tok, g_tok)
    trainer = UNetTrainer(latents, labels, clip_l, clip_g, clip_tok, g_tok, batch, lr)
    return run_training(trainer, steps, lr, log_every, "unet")


def diffusers_unet_config(cfg) -> dict:
    """The UNet2DConditionModel config.json of ``cfg`` (what the loader reads for head / time-id
    widths and GroupNorm groups, which the weights do not show)."""
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [d > 0 for d in cfg.transformer_depth]
    return {
        "_class_name": "UNet2DConditionModel",
        "_name_or_path": NAME,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "transformer_layers_per_block": [max(d, 1) for d in cfg.transformer_depth[:-1]]
        + [cfg.transformer_depth_middle],
        "num_attention_heads": [w // cfg.head_dim for w in widths],
        "cross_attention_dim": cfg.context_dim,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": cfg.time_id_dim,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "norm_num_groups": cfg.norm_groups,
        "use_linear_projection": True,
        "sample_size": cfg.sampling.size[0] // 2,
    }


def save_unet(out: Path, vae_folder: Path, unet, clip_l, clip_g, clip_tok, g_tok) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    (out / "unet").mkdir(parents=True)
    save_file(
        {k: v.half().contiguous() for k, v in unet.state_dict().items()},
        str(out / "unet" / "diffusion_pytorch_model.safetensors"),
        metadata={"fastflow.variant": NAME},
    )
    (out / "unet" / "config.json").write_text(json.dumps(diffusers_unet_config(unet.config), indent=1))
    shutil.copytree(vae_folder / "vae", out / "vae")  # the FLUX digits model's VAE, byte for byte
    clip_l.half().save_pretrained(out / "text_encoder")
    clip_g.half().save_pretrained(out / "text_encoder_2")
    clip_tok.save_pretrained(out / "tokenizer")
    g_tok.save_pretrained(out / "tokenizer_2")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_fastflow": NAME,
        "_fastflow_cpu_dtype": "float32",
        # trained with the empty prompt's embeddings as the unconditional branch, not zeros
        "force_zeros_for_empty_prompt": False,
    }
    (out / "model_index.json").write_text(json.dumps(index))
    # sampling defaults (steps, CFG, 16 px, view upscale) live in the model's config
    # (NAME in fastflow/models/configs.py), measured with bench/quality.py


def run(args, t0: float) -> int:
    """``--family unet``: the VAE from ``--vae-from`` (the embedded FLUX model), then the UNet."""
    from train_tiny import digits_dataset, vocabulary, weights_hash

    from fastflow.models.text import word_level_tokenizer

    images, labels = digits_dataset()
    vae_folder = Path(args.vae_from)
    vae, scale, shift = load_vae(vae_folder)
    with torch.no_grad():
        latents = (vae.encoder(images).chunk(2, dim=1)[0] - shift) * scale  # [N, 4, 8, 8]
    clip_tok = word_level_tokenizer(vocabulary(), "clip", max_length=TEXT_TOKENS)
    g_tok = word_level_tokenizer(vocabulary(), "clip", pad_zero=True, max_length=TEXT_TOKENS)
    unet, clip_l, clip_g = train_unet(latents, labels, clip_tok, g_tok, args.steps, args.batch, args.lr, args.log_every)
    stored = [m.half().float() for m in (unet, clip_l, clip_g)]
    digest = weights_hash(stored)
    save_unet(Path(args.out), vae_folder, unet, clip_l, clip_g, clip_tok, g_tok)
    n = sum(p.numel() for m in stored for p in m.parameters())
    print(f"{n} parameters ({sum(p.numel() for p in unet.parameters())} in the UNet)")
    print(f"saved {args.out} in {time.perf_counter() - t0:.0f} s; weights sha256 {digest}")
    return 0
