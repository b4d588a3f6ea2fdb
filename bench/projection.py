"""Per-step projections of the kernel second pass (no GPU, NO TIME MEASURED): attention per
FLUX.1-dev step, GroupNorm per VAE decode at 1024x1024, and the bytes per step that the removed
passes moved, before -> after.

Where the numbers come from:
* FLOPs and bytes are counted from the real shapes, and for fastflow's kernels from their own
  planned launches (``plan(...).bytes_moved``) on meta tensors.
* Attention throughput is not measurable here. The rows use published H100 figures as classes:
  the old 128x32 tiles at 250-350 TFLOP/s (the review's estimate), the Triton tutorial's tuned
  kernel ~460, FlashAttention-3 590-740 (its paper, D=128 forward). ``fastflow tune`` measures
  the real ones on a GPU.
* GroupNorm before: B x G = 32 programs on 132 SMs (at most 32/132 of the bandwidth if each
  program streamed at a full SM's share; the review estimated 3-8%) and 3 reads + 1 write; after:
  B x G x splits programs, 2 reads + 1 write, at the 80% target of bench/README.md.

    python bench/projection.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
from _ops_common import H100_BANDWIDTH, git_sha

from fastflow.kernels import attention_gelu_concat, groupnorm_silu, qk_norm_rope
from fastflow.kernels._common import meta

E = 2  # bytes per bf16 element
FLUX = {"double": 19, "single": 38, "heads": 24, "d": 128, "txt": 512, "img": 4096, "mlp": 12288}
SD35L = {"blocks": 38, "heads": 38, "d": 64, "ctx": 333, "x": 4096, "mlp": 4 * 2432}


def attention_rows() -> list[dict]:
    f = FLUX
    tokens = f["txt"] + f["img"]
    flops = (f["double"] + f["single"]) * 4 * f["heads"] * tokens * tokens * f["d"]
    rows = []
    for label, tflops in (
        ("before: 128x32 tiles (review estimate 250-350 TFLOP/s)", (250, 350)),
        ("after: 128x128 w8 s2, TMA + wgmma (Triton tutorial class ~460)", (460, 460)),
        ("after, FA3 where `fastflow tune` picks it (590-740)", (590, 740)),
    ):
        ms = [flops / (t * 1e12) * 1e3 for t in tflops]
        rows.append({"what": "attention per FLUX.1-dev step", "case": label, "tflop": flops / 1e12, "ms": ms})
    return rows


def _vae_decode_groupnorms() -> list[tuple[int, int]]:
    """(channels, side) of every GroupNorm + SiLU of the FLUX / SD3 VAE decoder at 1024x1024,
    recorded from the real decoder run on meta tensors."""
    from fastflow import ops
    from fastflow.models import vae as vae_module
    from fastflow.models.configs import from_name

    seen = []
    real = vae_module.ops.groupnorm_silu

    def record(x, weight, bias, groups, eps):
        seen.append((x.shape[1], x.shape[-1]))
        return torch.empty_like(x)

    with torch.device("meta"):
        decoder = vae_module.AutoEncoder(from_name("flux-vae")).decoder.to(torch.bfloat16)
    try:
        vae_module.ops.groupnorm_silu = record
        with ops.use_backend("reference"):
            decoder(meta(1, 16, 128, 128))
    finally:
        vae_module.ops.groupnorm_silu = real
    return seen


def groupnorm_rows() -> list[dict]:
    calls = _vae_decode_groupnorms()
    before_bytes = after_bytes = 0
    programs = []
    for c, side in calls:
        n = c * side * side * E
        before_bytes += 4 * n  # 3 reads (mean, centred variance, output) + 1 write
        p = groupnorm_silu.plan(meta(1, c, side, side), meta(c), meta(c), 32, 1e-6)
        after_bytes += p.stats.bytes_moved + p.apply.bytes_moved
        programs.append(p.apply.grid[0] * p.apply.grid[1])
    bw = H100_BANDWIDTH
    return [
        {
            "what": f"GroupNorm+SiLU per VAE decode at 1024^2 ({len(calls)} calls)",
            "case": "before: 32 programs, 3 reads + 1 write, at 24% (32/132 SMs) / 8% / 3% of bandwidth",
            "gb": before_bytes / 1e9,
            "ms": [before_bytes / (bw * share) * 1e3 for share in (32 / 132, 0.08, 0.03)],
        },
        {
            "what": f"GroupNorm+SiLU per VAE decode at 1024^2 ({len(calls)} calls)",
            "case": f"after: {min(programs)}-{max(programs)} programs per call, 2 reads + 1 write, at 80%",
            "gb": after_bytes / 1e9,
            "ms": [after_bytes / (bw * 0.8) * 1e3],
        },
    ]


def removed_pass_rows() -> list[dict]:
    """Bytes per step of the passes items 3-4 removed (each: a read and a write of the tensor)."""
    f, s = FLUX, SD35L
    flux_tokens, sd_tokens = f["txt"] + f["img"], s["ctx"] + s["x"]
    # the joint q/k/v buffers the kernel now writes in place of torch.cat, read off its plans
    flux_joint = qk_norm_rope.plan_joint(
        meta(1, f["txt"], 3 * 3072), meta(1, f["img"], 3 * 3072), *(meta(128),) * 4,
        meta(flux_tokens, 64, dtype=torch.float32), meta(flux_tokens, 64, dtype=torch.float32), 24, 1e-6,
    )  # fmt: skip
    qkv_out = sum(t.numel() * E for t in flux_joint[0].outputs)
    sd_qkv_out = 3 * s["heads"] * sd_tokens * s["d"] * E
    attn_out = f["heads"] * flux_tokens * f["d"] * E
    sd_attn_out = s["heads"] * sd_tokens * s["d"] * E
    mlp_act = flux_tokens * f["mlp"] * E  # double blocks: img + txt MLP up-projection outputs
    sd_mlp_act = sd_tokens * s["mlp"] * E
    single = attention_gelu_concat.plan(
        meta(1, flux_tokens, 24, 128).transpose(1, 2), meta(1, flux_tokens, 21504)[:, :, 9216:]
    )
    single_unfused = 2 * attn_out + 2 * (flux_tokens * f["mlp"] * E) * 2 + 2 * single.outputs.numel() * E
    rows = [
        ("FLUX.1-dev", "joint q/k/v torch.cat (3 tensors) -> written in place", f["double"] * 2 * qkv_out),
        ("FLUX.1-dev", "merge_heads copy of the double blocks' attention -> a view", f["double"] * 2 * attn_out),
        ("FLUX.1-dev", "MLP bias + GELU pass -> cuBLASLt GEMM epilogue", f["double"] * 2 * mlp_act),
        (
            "FLUX.1-dev",
            "single block merge_heads + MLP slice copy + GELU + cat -> attention_gelu_concat",
            f["single"] * (single_unfused - single.bytes_moved),
        ),
        ("SD3.5-large", "joint q/k/v torch.cat -> written in place", s["blocks"] * 2 * sd_qkv_out),
        ("SD3.5-large", "merge_heads copy -> a view", s["blocks"] * 2 * sd_attn_out),
        # every block's x and context MLPs but the last block's context (pre_only: no MLP)
        (
            "SD3.5-large",
            "MLP bias + GELU pass -> GEMM epilogue",
            s["blocks"] * 2 * sd_mlp_act - 2 * s["ctx"] * s["mlp"] * E,
        ),
    ]
    return [
        {"what": f"bytes removed per {model} step", "case": case, "gb": b / 1e9, "ms": [b / H100_BANDWIDTH * 1e3]}
        for model, case, b in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = attention_rows() + groupnorm_rows() + removed_pass_rows()
    print("NO GPU TIME WAS MEASURED: projections from counted FLOPs and bytes on an H100 SXM (3.35 TB/s).")
    what = None
    for r in rows:
        if r["what"] != what:
            what = r["what"]
            print(f"\n{what}")
        size = f"{r['tflop']:.1f} TFLOP" if "tflop" in r else f"{r['gb']:.2f} GB"
        ms = " / ".join(f"{m:.1f}" for m in r["ms"])
        print(f"  {r['case']:<84} {size:>11}  {ms:>19} ms")
    flux_saved = sum(r["gb"] for r in rows if r["what"] == "bytes removed per FLUX.1-dev step")
    print(f"\nFLUX.1-dev: {flux_saved:.1f} GB per step no longer moved = {flux_saved / 3.35:.1f} ms at full bandwidth")
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"bench": "projection", "sha": git_sha(), **r}) + "\n")


if __name__ == "__main__":
    main()
