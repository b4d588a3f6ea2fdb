"""The inputs ``fastflow tune`` times each op's kernels on: the shapes the kernels ship for (the
FLUX.1 / SD3.5 / SDXL / VAE shapes of fastflow/kernels, the same source as the attention shapes),
in bf16, one or two representative cases per op. ``small=True`` gives the same cases at toy sizes
(the CPU tests check that every case is a valid call of its op).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .reference import fp8_quantize_ref

DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Case:
    """One timed call: ``make(device)`` builds the op's full positional arguments."""

    name: str
    make: Callable[[torch.device], tuple]


# (rows, channels) of the row ops; (heads, head dim, txt tokens, img tokens) of the qk ops; ...
FULL = {
    "rows": {"flux img": (4096, 3072), "sd3.5-large": (4429, 2432)},
    "mlp": {"flux mlp": (4096, 12288)},
    "ff": {"sdxl ff 640": (4096, 2 * 2560), "sdxl ff 1280": (1024, 2 * 5120)},
    "vae": {"vae up 512x256": (512, 256), "vae up 128x1024": (128, 1024)},
    "heads": {"flux": (24, 128, 512, 4096), "sd3.5-large": (38, 64, 333, 4096)},
    "gemm": {"flux double qkv": (4096, 3072, 9216), "flux single linear2": (4608, 15360, 3072)},
    "quant": {"flux 3072": (4608, 3072), "flux linear2": (4608, 15360)},
}
SMALL = {
    "rows": {"small": (8, 64)},
    "mlp": {"small": (8, 64)},
    "ff": {"small": (8, 64)},
    "vae": {"small": (64, 4)},
    "heads": {"small": (2, 16, 3, 5)},
    "gemm": {"small": (8, 32, 16)},
    "quant": {"small": (8, 32)},
}


def _randn(dev, *shape, dtype=DTYPE):
    return torch.randn(*shape, device=dev).to(dtype)


def _fp8(dev, rows, k):
    return fp8_quantize_ref(_randn(dev, rows, k), None, True)  # (q e4m3 [rows, k], scale fp32 [rows])


def _row_cases(dims) -> dict[str, Callable]:
    def mod(dev, rows, c):
        return _randn(dev, 1, rows, c), 0.1 * _randn(dev, 1, c), 0.1 * _randn(dev, 1, c)

    def gated(dev, rows, c):
        return _randn(dev, 1, rows, c), _randn(dev, 1, c), _randn(dev, 1, rows, c)

    def gated_mod(dev, rows, c):
        x, gate, y = gated(dev, rows, c)
        _, shift, scale = mod(dev, 1, c)
        return x, gate, y, shift, scale, 1e-6

    return {
        "layernorm_modulate": lambda dev, rows, c: (*mod(dev, rows, c), 1e-6),
        "layernorm_modulate_fp8": lambda dev, rows, c: (*mod(dev, rows, c), 1e-6),
        "gated_residual": gated,
        "gated_residual_layernorm_modulate": gated_mod,
        "gated_residual_layernorm_modulate_fp8": gated_mod,
    }


def _qk(dev, heads, d, txt, img):
    s = [_randn(dev, d) for _ in range(4)]
    angles = torch.rand(txt + img, d // 2, device=dev) * 6.28
    return s, angles.cos(), angles.sin()


def _qk_cases() -> dict[str, Callable]:
    def qk_norm_rope(dev, heads, d, txt, img):
        s, cos, sin = _qk(dev, heads, d, 0, img)
        return _randn(dev, 1, img, 3 * heads * d), s[0], s[1], cos, sin, heads, 1e-6

    def joint(dev, heads, d, txt, img):
        s, cos, sin = _qk(dev, heads, d, txt, img)
        return _randn(dev, 1, txt, 3 * heads * d), _randn(dev, 1, img, 3 * heads * d), *s, cos, sin, heads, 1e-6

    def parts(dev, heads, d, txt, img):
        s, cos, sin = _qk(dev, heads, d, 0, img)
        return *(_randn(dev, 1, img, heads * d) for _ in range(3)), s[0], s[1], cos, sin, heads, 1e-6

    def joint_parts(dev, heads, d, txt, img):
        s, cos, sin = _qk(dev, heads, d, txt, img)
        a = [_randn(dev, 1, txt, heads * d) for _ in range(3)]
        b = [_randn(dev, 1, img, heads * d) for _ in range(3)]
        return *a, *b, *s, cos, sin, heads, 1e-6

    def qk_norm(dev, heads, d, txt, img):
        return _randn(dev, 1, img, 3 * heads * d), _randn(dev, d), _randn(dev, d), heads, 1e-6

    def gelu_concat(dev, heads, d, txt, img):
        attn = _randn(dev, 1, txt + img, heads, d).transpose(1, 2)  # [B, H, L, D] seen, [B, L, H, D] in memory
        return attn, _randn(dev, 1, txt + img, 4 * heads * d)

    return {
        "qk_norm_rope": qk_norm_rope,
        "joint_qk_norm_rope": joint,
        "qkv_norm_rope": parts,
        "joint_qkv_norm_rope": joint_parts,
        "qk_norm": qk_norm,
        "attention_gelu_concat": gelu_concat,
    }


def _fp8_cases() -> dict[str, Callable]:
    def scaled_mm(dev, m, k, n):
        xq, xs = _fp8(dev, m, k)
        w, ws = _fp8(dev, n, k)
        return xq, xs, w, ws, _randn(dev, n), False, DTYPE

    def linear(dev, m, k, n):
        w, ws = _fp8(dev, n, k)
        return _randn(dev, m, k), w, ws, _randn(dev, n), None, True, False

    return {"fp8_scaled_mm": scaled_mm, "fp8_linear": linear}


def cases(small: bool = False) -> dict[str, list[Case]]:
    """{op name: its timed cases} for every op with a kernel except attention (timed by
    :func:`fastflow.ops.attention_backends.tune`)."""
    dims = SMALL if small else FULL
    groups = {
        "rows": _row_cases(dims),
        "mlp": {
            "gelu_tanh": lambda dev, rows, w: (_randn(dev, 1, rows, w),),
            "bias_gelu_tanh": lambda dev, rows, w: (_randn(dev, 1, rows, w), _randn(dev, w)),
        },
        "ff": {"geglu": lambda dev, rows, w: (_randn(dev, 2, rows, w),)},
        "vae": {
            "groupnorm_silu": lambda dev, c, side: (
                _randn(dev, 1, c, side, side).contiguous(memory_format=torch.channels_last),
                _randn(dev, c),
                _randn(dev, c),
                32 if c % 32 == 0 else 4,
                1e-6,
            )
        },
        "heads": _qk_cases(),
        "gemm": _fp8_cases(),
        "quant": {
            "fp8_quantize": lambda dev, rows, k: (_randn(dev, rows, k), None, True),
            "gelu_tanh_fp8_quantize": lambda dev, rows, k: (_randn(dev, rows, k),),
        },
    }
    out: dict[str, list[Case]] = {}
    for group, builders in groups.items():
        for op, build in builders.items():
            out[op] = [
                Case(name, lambda dev, build=build, shape=shape: build(dev, *shape))
                for name, shape in dims[group].items()
            ]
    return out
