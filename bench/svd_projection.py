"""SVD-XT at 576x1024, 25 frames: bytes and FLOPs counted for one denoising step and the decode
(no GPU, NO TIME MEASURED; the time column is a projection from counted FLOPs at stated rates).

Counted on meta tensors from fastflow's own modules at the real config (``svd-xt``, the SVD VAE,
the ViT-H/14 image encoder):
* weights: parameter bytes in bf16, and with FP8 (``quant="fp8"`` turns the UNet's linear layers
  into 1-byte weights; convolutions, norms and the other models stay bf16);
* FLOPs of one UNet forward at the CFG batch (2 x 25 frames) from torch's FlopCounterMode, plus
  attention counted from every ``ops.attention`` call's shapes (4 * B * H * Lq * Lk * D: a custom
  op the counter cannot see);
* the largest single activation of the step and of a decode chunk (each operator output's bytes;
  attention as a fused kernel, whose scores are never stored):
  the peak needs the weights, the latents and a few such tensors alive at once, so the projected
  peak below is weights + 4 x the largest activation, a stated assumption, not a measurement;
* a step time from the FLOPs at 60% and 40% of the H100's dense bf16 (989 TFLOP/s) and FP8 (1979
  TFLOP/s, the linear layers' FLOPs only: convolutions and attention stay bf16).

    python bench/svd_projection.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fastflow import ops
from fastflow.models import unet as unet_module
from fastflow.models.clip_vision import SVD_IMAGE_ENCODER, CLIPVisionModelWithProjection
from fastflow.models.configs import from_name
from fastflow.models.unet_video import VideoUNet
from fastflow.models.vae_video import VIDEO_VAE_CONFIGS, VideoAutoEncoder

E = 2  # bf16 bytes
H, W, FRAMES, CFG = 576, 1024, 25, 2
GIB = 2**30


class Largest(TorchDispatchMode):
    """The largest operator output (bytes) seen while it is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * E)
        return out


def _attention_counter(flops: list[int]):
    real = ops.attention

    def counted(q, k, v, *args, **kwargs):
        b, h, lq, d = q.shape
        flops.append(4 * b * h * lq * k.shape[-2] * d)
        return q.new_empty(*q.shape[:-1], v.shape[-1])  # a fused kernel: the scores never exist

    return real, counted


def _linear_params(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = from_name("svd-xt")
    with torch.device("meta"):
        unet = VideoUNet(config).to(torch.bfloat16)
        vae = VideoAutoEncoder(VIDEO_VAE_CONFIGS["svd-vae"]).to(torch.bfloat16)
        encoder = CLIPVisionModelWithProjection(SVD_IMAGE_ENCODER).to(torch.bfloat16)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("image_encoder", encoder))}  # fmt: skip
    linear = _linear_params(unet)
    weights_bf16 = sum(params.values()) * E
    weights_fp8 = weights_bf16 - linear * (E - 1)

    h, w = H // 8, W // 8
    sample = torch.empty(CFG, FRAMES, 8, h, w, device="meta", dtype=torch.bfloat16)
    context = torch.empty(CFG, 1, config.context_dim, device="meta", dtype=torch.bfloat16)
    ids = torch.empty(CFG, 3, device="meta", dtype=torch.bfloat16)
    attention: list[int] = []
    real, counted = _attention_counter(attention)
    unet_module.ops.attention = counted
    try:
        largest = Largest()
        with FlopCounterMode(display=False) as counter, largest:
            unet(sample, torch.tensor(1.0, device="meta"), context, ids)
        step_attention = sum(attention)  # (the decode's attention is not the step's)
        decode = {}
        for chunk in (1, 2, 4, 8, 14, 25):
            z = torch.empty(chunk, 4, h, w, device="meta", dtype=torch.bfloat16)
            tracked = Largest()
            with tracked:
                vae.decode(z, num_frames=chunk)
            decode[chunk] = tracked.largest / GIB
    finally:
        unet_module.ops.attention = real
    step_flops = counter.get_total_flops() + step_attention
    counts = counter.get_flop_counts()["Global"]
    mm_flops = sum(n for op, n in counts.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm"))
    rows = {
        "config": f"svd-xt {H}x{W}, {FRAMES} frames, CFG batch {CFG}",
        "params": params,
        "unet_linear_params": linear,
        "weights_bf16_gib": weights_bf16 / GIB,
        "weights_fp8_gib": weights_fp8 / GIB,
        "step_tflop": step_flops / 1e12,
        "step_attention_tflop": step_attention / 1e12,
        "step_largest_activation_gib": largest.largest / GIB,
    }
    rows["step_linear_tflop"] = mm_flops / 1e12
    bf16, fp8 = 989e12, 1979e12
    rows["step_ms_projected_bf16"] = [step_flops / (bf16 * u) * 1e3 for u in (0.6, 0.4)]
    # FP8: the linear layers' FLOPs at the FP8 rate, convolutions and attention still bf16
    rows["step_ms_projected_fp8"] = [(mm_flops / fp8 + (step_flops - mm_flops) / bf16) / u * 1e3 for u in (0.6, 0.4)]
    rows["decode_largest_activation_gib_by_chunk"] = decode
    peak_step = weights_bf16 + 4 * rows["step_largest_activation_gib"] * GIB
    rows["projected_peak_gib_step_bf16"] = peak_step / GIB
    rows["projected_peak_gib_step_fp8"] = (peak_step - (weights_bf16 - weights_fp8)) / GIB
    rows["projected_peak_gib_decode_by_chunk"] = {c: (weights_bf16 + 4 * g * GIB) / GIB for c, g in decode.items()}
    for key, value in rows.items():
        print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
