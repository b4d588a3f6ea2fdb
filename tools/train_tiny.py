"""Train the embedded models on scikit-learn's handwritten digits: ``fastflow-tiny-digits`` (FLUX,
the default) and, with ``--family unet``, ``fastflow-tiny-digits-unet`` (SDXL's UNet; its recipe is
tools/train_tiny_unet.py).

Offline and on a CPU: the 1,797 8x8 digits of ``sklearn.datasets.load_digits``, upsampled to 16x16
RGB, with fastflow's own classes unchanged: the VAE (AutoEncoder, a 4-channel latent at 8x8), the
FLUX transformer (a tiny config of the same architecture, no guidance embedding: classifier-free
guidance at sampling time instead, so prompts are dropped 10% of the time in training), and
transformers' CLIPTextModel + T5EncoderModel with word-level tokenizers built with ``tokenizers``,
trained jointly with the transformer so that free-text prompts work ("a handwritten seven",
"the digit 3", "number nine").

Recipe: VAE with MSE + a small KL; then rectified flow (x_t = (1 - t) x0 + t eps, target
eps - x0) with logit-normal t (the SD3 paper), AdamW and an EMA of the weights. Reproducible:
fixed seeds, a fixed thread count and deterministic algorithms give the same weights hash.

    python tools/train_tiny.py --out fastflow/assets/fastflow-tiny-digits     # ~20-30 min on 2 cores
    nice python tools/train_tiny.py --family unet --threads 1   # ~18 min (1,107 s) niced, busy 2 cores
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastflow.models import AutoEncoder, Flux, from_name
from fastflow.models.flux import make_img_ids, pack_latents
from fastflow.models.text import word_level_tokenizer

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten {w}", "the digit {d}", "number {w}", "the number {d}", "a {w}", "{d}", "{w}",
    "digit {w}", "the digit {w}", "a handwritten digit {d}", "handwritten {d}", "an image of the number {w}",
    "a picture of a {w}", "a drawing of the digit {d}", "number {d}", "the handwritten number {w}",
    "a written {w}", "the numeral {d}",
]  # fmt: skip
EXTRA_WORDS = ["a", "an", "the", "handwritten", "digit", "number", "numeral", "image", "picture", "of",
               "drawing", "written", "hand", "handwriting", "sketch", "figure"]  # fmt: skip
IMAGE_SIZE = 16
P_EMPTY = 0.1
TEXT_TOKENS = 8  # the longest prompt ("an image of the number seven") is 6 words + specials
ASSETS = Path(__file__).resolve().parent.parent / "fastflow" / "assets"
DEFAULT_STEPS = {"flux": 6000, "unet": 1500}
DEFAULT_BATCH = {"flux": 64, "unet": 32}


def prompts_for(digit: int) -> list[str]:
    return [t.format(w=NUMBER_WORDS[digit], d=digit) for t in TEMPLATES]


def vocabulary() -> list[str]:
    return [*EXTRA_WORDS, *NUMBER_WORDS, *map(str, range(10))]


def digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 3, 16, 16] images in [-1, 1] (grey, bilinear x2 of the 8x8 digits) and labels [N]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    up = F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (up.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous(), torch.tensor(data.target)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def train_vae(images: torch.Tensor, steps: int, batch: int, log_every: int) -> AutoEncoder:
    vae = AutoEncoder(from_name("fastflow-tiny-digits-vae"))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,))]
        mean, logvar = vae.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = vae.decoder(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"vae step {step:5d}  mse {F.mse_loss(recon, x).item():.4f}  kl {kl.item():.3f}", flush=True)
    return vae.eval()


def build_text_models(clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    cfg = from_name("fastflow-tiny-digits")
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=cfg.vec_in_dim, intermediate_size=2 * cfg.vec_in_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_TOKENS,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, projection_dim=cfg.vec_in_dim,
    ))  # fmt: skip
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok), d_model=cfg.context_in_dim, d_kv=16, d_ff=2 * cfg.context_in_dim, num_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, decoder_start_token_id=0,
    ))  # fmt: skip
    return clip, t5


class JointTrainer:
    """What both trainers share (this tool's FLUX one and train_tiny_unet's): AdamW over the model and
    both text encoders (``modules()``), an EMA copy of them, one clipped optimizer step."""

    def setup_optimizer(self, lr: float) -> None:
        params = [p for m in self.modules() for p in m.parameters()]
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
        self.ema = copy.deepcopy(self.modules())
        for m in self.ema:
            m.requires_grad_(False)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def optimize(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in self.modules() for p in m.parameters()], 1.0)
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for live, ema in zip(self.modules(), self.ema, strict=True):
            for p, q in zip(live.parameters(), ema.parameters(), strict=True):
                q.lerp_(p, 1 - decay)


def run_training(trainer, steps: int, lr: float, log_every: int, label: str):
    """Warm-up then cosine learning rate, an EMA ramp; returns the EMA modules."""
    warmup = max(1, min(500, steps // 10))
    running, t0 = None, time.perf_counter()
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * (0.5 * (1 + np.cos(np.pi * step / max(steps, 1))) * 0.9 + 0.1)
        loss = trainer.step(lr * scale)
        trainer.update_ema(min(0.999, (1 + step) / (10 + step)))
        running = loss if running is None else 0.98 * running + 0.02 * loss
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"{label} step {step:6d}  loss {running:.4f}  {time.perf_counter() - t0:7.1f} s", flush=True)
    return trainer.ema


class Trainer(JointTrainer):
    """Flow-matching training of the transformer jointly with both text encoders."""

    def __init__(self, latents, labels, clip, t5, clip_tok, t5_tok, batch: int, lr: float):
        self.cfg = from_name("fastflow-tiny-digits")
        self.model = Flux(self.cfg)
        self.clip, self.t5 = clip, t5
        self.latents, self.labels, self.batch = latents, labels, batch
        prompts = [prompts_for(d) for d in range(10)]
        flat = [p for ps in prompts for p in ps] + [""]
        self.clip_ids = clip_tok(
            flat, padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        self.t5_ids = t5_tok(
            flat, padding="max_length", max_length=self.cfg.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        self.per_digit, self.empty = len(TEMPLATES), len(flat) - 1
        h = self.latents.shape[-1] // 2
        self.img_ids = make_img_ids(h, h)
        self.setup_optimizer(lr)

    def modules(self):
        return [self.model, self.clip, self.t5]

    def step(self, lr: float) -> float:
        self.set_lr(lr)
        idx = torch.randint(0, len(self.latents), (self.batch,))
        x0 = pack_latents(self.latents[idx])  # [B, 16, 16]
        prompt = self.labels[idx] * self.per_digit + torch.randint(0, self.per_digit, (self.batch,))
        prompt = torch.where(torch.rand(self.batch) < P_EMPTY, torch.full_like(prompt, self.empty), prompt)
        y = self.clip(self.clip_ids[prompt]).pooler_output
        txt = self.t5(self.t5_ids[prompt]).last_hidden_state
        t = torch.sigmoid(torch.randn(self.batch))  # logit-normal(0, 1)
        noise = torch.randn_like(x0)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        v = self.model(xt, txt, y, t, self.img_ids)
        return self.optimize(F.mse_loss(v, noise - x0))


def train_flow(latents, labels, clip_tok, t5_tok, steps: int, batch: int, lr: float, log_every: int):
    clip, t5 = build_text_models(clip_tok, t5_tok)
    trainer = Trainer(latents, labels, clip, t5, clip_tok, t5_tok, batch, lr)
    return run_training(trainer, steps, lr, log_every, "flow")


def weights_hash(modules) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(out: Path, vae, scale: float, shift: float, flux, clip, t5, clip_tok, t5_tok) -> None:
    from safetensors.torch import save_file

    if out.exists():
        shutil.rmtree(out)
    for sub in ("transformer", "vae"):
        (out / sub).mkdir(parents=True)
    half = {k: v.half().contiguous() for k, v in flux.state_dict().items()}
    save_file(
        half,
        str(out / "transformer" / "diffusion_pytorch_model.safetensors"),
        metadata={"fastflow.variant": "fastflow-tiny-digits"},
    )
    save_file(
        {k: v.half().contiguous() for k, v in vae.state_dict().items()},
        str(out / "vae" / "diffusion_pytorch_model.safetensors"),
    )
    (out / "vae" / "config.json").write_text(json.dumps({"scaling_factor": scale, "shift_factor": shift}, indent=1))
    clip.half().save_pretrained(out / "text_encoder")
    t5.half().save_pretrained(out / "text_encoder_2")
    clip_tok.save_pretrained(out / "tokenizer")
    t5_tok.save_pretrained(out / "tokenizer_2")
    (out / "model_index.json").write_text(
        json.dumps({"_class_name": "FluxPipeline", "_fastflow": "fastflow-tiny-digits"})
    )
    # sampling defaults (16 steps, true CFG 1.5, 16 px, view upscale 16) live in the model's config
    # ("fastflow-tiny-digits" in fastflow/models/configs.py), measured with bench/quality.py


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux", choices=["flux", "unet"], help="flux: fastflow-tiny-digits; "
                        "unet: fastflow-tiny-digits-unet (tools/train_tiny_unet.py)")  # fmt: skip
    parser.add_argument("--out", default=None, help="default: fastflow/assets/<the family's model>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="fixed for reproducible float sums")
    parser.add_argument("--vae-steps", type=int, default=800, help="flux only")
    parser.add_argument("--vae-batch", type=int, default=32, help="flux only")
    parser.add_argument("--vae-from", default=str(ASSETS / "fastflow-tiny-digits"),
                        help="unet only: the model folder whose trained VAE the UNet model reuses")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help=f"denoiser steps (default {DEFAULT_STEPS})")
    parser.add_argument("--batch", type=int, default=None, help=f"default {DEFAULT_BATCH}")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=500)
    args = parser.parse_args(argv)
    args.steps = DEFAULT_STEPS[args.family] if args.steps is None else args.steps
    args.batch = DEFAULT_BATCH[args.family] if args.batch is None else args.batch
    name = "fastflow-tiny-digits" if args.family == "flux" else "fastflow-tiny-digits-unet"
    args.out = str(ASSETS / name) if args.out is None else args.out

    t0 = time.perf_counter()
    seed_everything(args.seed, args.threads)
    if args.family == "unet":
        import train_tiny_unet  # tools/ is on sys.path when this file runs as a script

        return train_tiny_unet.run(args, t0)
    images, labels = digits_dataset()
    vae = train_vae(images, args.vae_steps, args.vae_batch, args.log_every)
    with torch.no_grad():
        mean = vae.encoder(images).chunk(2, dim=1)[0]  # [N, 4, 8, 8]
    shift, scale = mean.mean().item(), 1.0 / mean.std().item()
    latents = (mean - shift) * scale
    clip_tok = word_level_tokenizer(vocabulary(), "clip", max_length=TEXT_TOKENS)
    t5_tok = word_level_tokenizer(vocabulary(), "t5", max_length=TEXT_TOKENS)
    flux, clip, t5 = train_flow(latents, labels, clip_tok, t5_tok, args.steps, args.batch, args.lr, args.log_every)
    # round to the stored precision first, so that the hash describes the shipped weights
    stored = [m.half().float() for m in (vae, flux, clip, t5)]
    digest = weights_hash(stored)
    save(Path(args.out), vae, scale, shift, flux, clip, t5, clip_tok, t5_tok)
    print(f"saved {args.out} in {time.perf_counter() - t0:.0f} s; weights sha256 {digest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
