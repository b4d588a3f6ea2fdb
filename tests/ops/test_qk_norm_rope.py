import pytest
import torch

import fastflow.ops as ops
from fastflow.errors import InputError
from fastflow.models.flux import EmbedND, make_img_ids
from fastflow.ops.reference import qk_norm_rope_ref

from ._checks import assert_op_contract


def _rotate_complex(x, angles):
    """RoPE as complex multiplication of (x[2j] + i x[2j+1]) by e^{i angle}: an independent formula."""
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize("heads,head_dim,seq", [(2, 32, 15), (3, 64, 1), (1, 128, 37)])
def test_matches_complex_rotation(heads, head_dim, seq):
    g = torch.Generator().manual_seed(1)
    b = 2
    qkv = torch.randn(b, seq, 3 * heads * head_dim, generator=g)
    q_scale, k_scale = (
        1 + 0.1 * torch.randn(head_dim, generator=g),
        1 + 0.1 * torch.randn(head_dim, generator=g),
    )
    angles = torch.rand(seq, head_dim // 2, generator=g, dtype=torch.float64) * 100
    q, k, v = qk_norm_rope_ref(qkv, q_scale, k_scale, angles.cos().float(), angles.sin().float(), heads, 1e-6)

    parts = qkv.double().view(b, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()

    torch.testing.assert_close(q.double(), _rotate_complex(rms(parts[0], q_scale), angles), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.double(), _rotate_complex(rms(parts[1], k_scale), angles), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, parts[2].float())
    assert q.shape == (b, heads, seq, head_dim) and v.is_contiguous()


def test_rope_tables_from_ids_are_exact_at_large_positions():
    # positions above 256 are not exact in bf16 ids (diffusers' trap); ours stay exact in fp64
    embed = EmbedND(128, 10_000, (16, 56, 56))
    cos, sin = embed(make_img_ids(1, 300))
    omega = 1.0 / 10_000 ** (torch.arange(0, 56, 2, dtype=torch.float64) / 56)
    assert torch.equal(cos[299, 36:], (299 * omega).cos().float())
    assert torch.equal(sin[299, 8:36], torch.zeros(28))  # row axis is 0 for a 1-row grid


def test_op_contract_on_a_strided_slice():
    heads, d, seq = 2, 16, 9
    fused = torch.randn(2, seq, 3 * heads * d + 40)  # like FLUX single-block linear1 output [qkv | mlp]
    qkv = fused[..., : 3 * heads * d]
    angles = torch.rand(seq, d // 2)
    args = (qkv, torch.rand(d) + 0.5, torch.rand(d) + 0.5, angles.cos(), angles.sin(), heads, 1e-6)
    assert_op_contract(ops.qk_norm_rope, torch.ops.fastflow.qk_norm_rope.default, args)


def test_bad_table_shape_is_a_clear_error():
    qkv = torch.randn(1, 4, 3 * 2 * 8)
    with pytest.raises(InputError, match="RoPE tables"):
        ops.qk_norm_rope(qkv, torch.ones(8), torch.ones(8), torch.ones(5, 4), torch.ones(5, 4), 2)


def _joint_args(rope=True, la=3, lb=7, heads=2, d=16, b=2):
    g = torch.Generator().manual_seed(0)
    a, bb = torch.randn(b, la, 3 * heads * d, generator=g), torch.randn(b, lb, 3 * heads * d, generator=g)
    scales = [torch.rand(d, generator=g) + 0.5 for _ in range(4)]
    angles = torch.rand(la + lb, d // 2, generator=g)
    tables = (angles.cos(), angles.sin()) if rope else (None, None)
    return (a, bb, *scales, *tables, heads, 1e-6)


@pytest.mark.parametrize("rope", [True, False], ids=["flux", "sd3"])
def test_joint_op_equals_the_streams_joined(rope):
    """The joint op gives exactly the per-stream ops' outputs concatenated along the tokens (what
    the models did before), in one set of contiguous [B, H, La + Lb, D] tensors."""
    a, b, aq, ak, bq, bk, cos, sin, heads, eps = _joint_args(rope)
    if rope:
        first = ops.qk_norm_rope(a, aq, ak, cos[:3], sin[:3], heads, eps)
        second = ops.qk_norm_rope(b, bq, bk, cos[3:], sin[3:], heads, eps)
    else:
        first, second = ops.qk_norm(a, aq, ak, heads, eps), ops.qk_norm(b, bq, bk, heads, eps)
    joint = ops.joint_qk_norm_rope(a, b, aq, ak, bq, bk, cos, sin, heads, eps)
    for got, x, y in zip(joint, first, second, strict=True):
        assert torch.equal(got, torch.cat((x, y), dim=2)) and got.is_contiguous()
    args = _joint_args(rope)
    assert_op_contract(ops.joint_qk_norm_rope, torch.ops.fastflow.joint_qk_norm_rope.default, args)


def test_joint_op_bad_inputs_are_clear_errors():
    a, b, aq, ak, bq, bk, cos, sin, heads, eps = _joint_args()
    with pytest.raises(InputError, match=r"RoPE tables must be \[10, 8\]"):
        ops.joint_qk_norm_rope(a, b, aq, ak, bq, bk, cos[:7], sin[:7], heads, eps)
    with pytest.raises(InputError, match="share batch, width and dtype"):
        ops.joint_qk_norm_rope(a, b[:1], aq, ak, bq, bk, cos, sin, heads, eps)
    with pytest.raises(InputError, match="both RoPE tables"):
        ops.joint_qk_norm_rope(a, b, aq, ak, bq, bk, cos, None, heads, eps)
    with pytest.raises(InputError, match="norm scales of both streams"):
        ops.joint_qk_norm_rope(a, b, aq, None, bq, bk, cos, sin, heads, eps)
