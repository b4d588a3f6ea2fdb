"""attention kernel(s) under the Triton interpreter vs the reference (tolerance rule: _numerics.py)."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import reference as ref

from ._numerics import DTYPES, check, rand


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 2, 70, 64, 45), (1, 1, 33, 128, 100), (2, 1, 1, 64, 1)], ids=lambda s: "x".join(map(str, s))
)
def test_attention(shape, dtype, tma):
    """Odd query / key lengths (masked tails), M != N, head dims 64 and 128; both load paths
    (tensor descriptors as on sm_90+, pointers as on sm_80 / 89)."""
    from fastflow.kernels.attention import plan

    b, h, m, d, n = shape
    q, k, v = (
        rand(b, h, m, d, dtype=dtype),
        rand(b, h, n, d, dtype=dtype, seed=1),
        rand(b, h, n, d, dtype=dtype, seed=2),
    )
    check(plan(q, k, v, None, tma=tma)(), ref.attention_ref, (q, k, v, None), dtype)


def test_attention_strided_inputs():
    """q/k/v as produced by a [B, L, H, D] -> [B, H, L, D] transpose: read in place (no copy)."""
    from fastflow.kernels.attention import attention_fwd, plan

    q, k, v = (rand(1, 40, 2, 64, dtype=torch.bfloat16, seed=s).transpose(1, 2) for s in range(3))
    assert plan(q, k, v, 0.1).reads[0] is q
    check(attention_fwd(q, k, v, 0.1), ref.attention_ref, (q, k, v, 0.1), torch.bfloat16)
    check(plan(q, k, v, 0.1, tma=False)(), ref.attention_ref, (q, k, v, 0.1), torch.bfloat16)


@pytest.mark.parametrize("d", [64, 128, 80])
def test_output_layout_is_blhd(d):
    """Kernel, SDPA fallback (d=80), reference and fake all return [B, L, H, D] memory seen as
    [B, H, L, D]: merge_heads is a view, and torch.compile's stride assertions hold."""
    from fastflow import ops
    from fastflow.models.layers import merge_heads
    from fastflow.ops.attention_backends import attention

    q = rand(2, 3, 17, d, dtype=torch.bfloat16)
    for out in (attention(q, q, q, None), ref.attention_ref(q, q, q), ops.attention(q, q, q)):
        assert out.shape == (2, 3, 17, d) and out.transpose(1, 2).is_contiguous()
        assert merge_heads(out).data_ptr() == out.data_ptr()
    with torch._subclasses.FakeTensorMode():
        fq = torch.empty(2, 3, 17, d, dtype=torch.bfloat16)
        fake = torch.ops.fastflow.attention(fq, fq, fq, None)
    assert fake.stride() == out.stride()


@pytest.mark.parametrize("persistent", [False, True], ids=["tiled", "persistent"])
@pytest.mark.parametrize("arch", [80, 89, 90, 100, 120])
@pytest.mark.parametrize("d", [64, 128])
def test_shipped_gpu_tiles_run(arch, d, persistent):
    """The tile configurations the GPUs run (not the interpreter default), ragged in M and N; the
    persistent variant with fewer programs than tiles, so each program walks several tiles."""
    from fastflow.kernels.attention import persistent_ok, plan

    q, k, v = (rand(2, 2, n, d, dtype=torch.bfloat16, seed=s) for s, n in ((0, 130), (1, 200), (2, 200)))
    if persistent and not persistent_ok(arch):
        with pytest.raises(ValueError, match="not shipped"):
            plan(q, k, v, None, arch=arch, persistent=persistent)
        return
    launch = plan(q, k, v, None, arch=arch, persistent=persistent)
    assert launch.meta["BLOCK_M"] == 128
    if persistent:
        assert launch.args[-2] == 8  # 2 x 2 heads x 2 query tiles
        launch.grid = (3,)
    launch.meta = {k: v for k, v in launch.meta.items() if k not in ("num_warps", "num_stages")}
    check(launch(), ref.attention_ref, (q, k, v, None), torch.bfloat16)


def test_views_tma_cannot_address_fall_back_to_sdpa(monkeypatch):
    import fastflow.kernels.attention as attention
    from fastflow.ops import attention_backends

    calls = []
    monkeypatch.setattr(attention, "attention_fwd", lambda *a, **kw: calls.append(a) or ref.attention_ref(*a))
    q = rand(1, 2, 16, 64, dtype=torch.bfloat16)
    assert attention.tma_ready(q)
    with ops.use_backend("triton"):  # the kernel asked for by name (by default only a tune table picks it)
        attention_backends.attention(q, q, q, None)
        assert len(calls) == 1
        buf = rand(2 * 16 * 64 + 1, dtype=torch.bfloat16)
        shifted = buf[1:].view(1, 2, 16, 64)  # base address 2 bytes past alignment
        assert not attention.tma_ready(shifted)
        out = attention_backends.attention(shifted, shifted, shifted, None)
    assert len(calls) == 1  # SDPA ran
    check(out, ref.attention_ref, (shifted, shifted, shifted, None), torch.bfloat16)
