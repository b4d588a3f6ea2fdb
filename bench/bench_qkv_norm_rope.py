"""joint_qkv_norm_rope: what the compile backend puts in place of diffusers' FLUX attention inputs
(1024x1024: txt 512 + img 4096 tokens, H 24, D 128). From the six to_q / to_k / to_v projections
of both streams, the fused op writes q, k, v in attention layout in two launches. diffusers' eager
path: per stream, q and k RMSNorm (upcast, pow, mean, rsqrt-mul, weight mul), the three [B, L, H, D]
-> txt|img cats, then RoPE on q and k over all tokens (upcast, rotate, cos, sin, add, downcast)
and the transposes to [B, H, L, D]. Byte model as bench_qk_norm_rope.py. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main
from bench_qk_norm_rope import HEAD_DIM, HEADS, _unfused_passes_per_qk

from fastflow.kernels.qk_norm_rope import plan_joint_parts
from fastflow.ops import joint_qkv_norm_rope
from fastflow.ops.reference import joint_qkv_norm_rope_ref

TXT, IMG = 512, 4096


class _Plan:
    """Both launches as one plan: their bytes, and calling it runs both."""

    def __init__(self, launches):
        self.launches = launches
        self.bytes_moved = sum(launch.bytes_moved for launch in launches)

    def __call__(self):
        for launch in self.launches:
            out = launch()
        return out  # one set of buffers, written by both


def _plan(q_a, k_a, v_a, q_b, k_b, v_b, *rest):
    return _Plan(plan_joint_parts((q_a, k_a, v_a), (q_b, k_b, v_b), *rest))


def case(e=2, txt=TXT, img=IMG, name="diffusers flux joint txt 512 + img 4096"):
    n = (txt + img) * HEADS * HEAD_DIM  # elements of each of q, k, v over both streams
    unfused = 2 * _unfused_passes_per_qk(e) * n + (2 * e + 2 * e) * n  # q and k; v: cat + transpose

    def make(dev, dt):
        projections = [
            torch.randn(1, tokens, HEADS * HEAD_DIM, device=dev, dtype=dt) for tokens in (txt,) * 3 + (img,) * 3
        ]
        scales = [torch.ones(HEAD_DIM, device=dev, dtype=dt) for _ in range(4)]
        tables = (torch.ones(txt + img, HEAD_DIM // 2, device=dev), torch.zeros(txt + img, HEAD_DIM // 2, device=dev))
        return (*projections, *scales, *tables, HEADS, 1e-6)

    return Case(name, make, unfused_bytes=int(unfused), unfused_kernels=40,
                flops=20 * n)  # fmt: skip


if __name__ == "__main__":
    main(
        "joint_qkv_norm_rope",
        joint_qkv_norm_rope,
        joint_qkv_norm_rope_ref,
        [case()],
        _plan,
        tiny=[case(txt=8, img=16, name="tiny")],
    )
