"""attention kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 2, 70, 64, 45), (1, 1, 33, 128, 100), (2, 1, 1, 64, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_attention(shape, dtype):
    """Odd query / key lengths (masked tails), M != N, head dims 64 and 128."""
    from fastflow.kernels.attention import attention_fwd

    b, h, m, d, n = shape
    q, k, v = (
        rand(b, h, m, d, dtype=dtype),
        rand(b, h, n, d, dtype=dtype, seed=1),
        rand(b, h, n, d, dtype=dtype, seed=2),
    )
    check(attention_fwd(q, k, v, None), ref.attention_ref, (q, k, v, None), dtype)


def test_attention_strided_inputs():
    """q/k/v as produced by a [B, L, H, D] -> [B, H, L, D] transpose (not contiguous)."""
    from fastflow.kernels.attention import attention_fwd

    q, k, v = (rand(1, 40, 2, 64, dtype=torch.bfloat16, seed=s).transpose(1, 2) for s in range(3))
    check(attention_fwd(q, k, v, 0.1), ref.attention_ref, (q, k, v, 0.1), torch.bfloat16)


@pytest.mark.parametrize("arch", [80, 89, 90, 100, 120])
@pytest.mark.parametrize("d", [64, 128])
def test_shipped_gpu_tiles_run(arch, d):
    """The tile configurations the GPUs run (not the interpreter default), ragged in M and N."""
    from fastflow.kernels.attention import plan

    q, k, v = (rand(1, 1, n, d, dtype=torch.bfloat16, seed=s) for s, n in ((0, 130), (1, 200), (2, 200)))
    launch = plan(q, k, v, None, arch=arch)
    assert launch.meta["BLOCK_M"] == 128
    launch.meta = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    check(launch(), ref.attention_ref, (q, k, v, None), torch.bfloat16)


def test_views_tma_cannot_address_fall_back_to_sdpa(monkeypatch):
    import fastflow.kernels.attention as attention

    calls = []
    monkeypatch.setattr(attention, "attention_fwd", lambda *a: calls.append(a) or ref.attention_ref(*a))
    q = rand(1, 2, 16, 64, dtype=torch.bfloat16)
    assert attention.tma_ready(q)
    attention.attention(q, q, q, None)
    assert len(calls) == 1
    buf = rand(2 * 16 * 64 + 1, dtype=torch.bfloat16)
    shifted = buf[1:].view(1, 2, 16, 64)  # base address 2 bytes past alignment
    assert not attention.tma_ready(shifted)
    out = attention.attention(shifted, shifted, shifted, None)
    assert len(calls) == 1  # SDPA ran
    check(out, ref.attention_ref, (shifted, shifted, shifted, None), torch.bfloat16)
