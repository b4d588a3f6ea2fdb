"""attention_gelu_concat on FLUX.1's single blocks (4608 tokens, 24 x 128 heads, MLP 12288 read as a
slice of linear1's 21504 columns). Eager: a contiguous copy of the MLP slice, GELU, merge_heads'
copy of the attention output and torch.cat: four kernels. See bench/_ops_common.py."""

import torch
from _ops_common import Case, main

from fastflow.kernels.attention_gelu_concat import plan
from fastflow.ops import attention_gelu_concat
from fastflow.ops.reference import attention_gelu_concat_ref

SHAPES = {"flux single 4608": (4608, 24, 128, 12288, 21504)}


def case(name, tokens, heads, d, m, linear1, e=2):
    a, n = tokens * heads * d, tokens * m
    return Case(
        name,
        lambda dev, dt: (
            torch.randn(1, heads, tokens, d, device=dev, dtype=dt),
            torch.randn(1, tokens, linear1, device=dev, dtype=dt)[:, :, linear1 - m :],
        ),
        # slice copy (r+w n), GELU (r+w n), merge_heads (r+w a), cat (r a+n, w a+n)
        unfused_bytes=(2 * n + 2 * n + 2 * a + 2 * (a + n)) * e,
        unfused_kernels=4,
        flops=10 * n,
    )


if __name__ == "__main__":
    main(
        "attention_gelu_concat",
        attention_gelu_concat,
        attention_gelu_concat_ref,
        [case(k, *v) for k, v in SHAPES.items()],
        plan,
        tiny=[case("tiny", 16, 2, 32, 256, 448)],
    )
