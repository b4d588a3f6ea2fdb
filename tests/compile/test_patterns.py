"""Each rewrite of the "fastflow" backend on small modules written the way diffusers writes the
pattern and the way a hand-written module might, plus the near misses it must leave alone. The
graphs are captured by dynamo and rewritten without inductor (fast); numerics are checked by
running the rewritten graph."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastflow.compile as fc


def _rewritten(module, *args):
    """(counts, eager output, rewritten-graph output) for module(*args)."""
    counts = {}

    def capture(gm, example_inputs):
        counts.update(fc.rewrite(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        expected = module(*args)
        got = torch.compile(module, backend=capture, fullgraph=True)(*args)
    return counts, expected, got


def _inputs(b=2, seq=5, c=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, seq, c, generator=g).to(dtype),
        torch.randn(b, c, generator=g).to(dtype),
        torch.randn(b, c, generator=g).to(dtype),
    )


class DiffusersModulate(nn.Module):  # AdaLayerNormZero
    def __init__(self, c=16, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=eps)

    def forward(self, x, shift, scale):
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class ContinuousModulate(nn.Module):  # AdaLayerNormContinuous: (1 + scale)[:, None, :]
    def forward(self, x, shift, scale):
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale)[:, None, :] + shift[:, None, :]


class HandModulate(nn.Module):  # unsqueeze, the other operand order
    def forward(self, x, shift, scale):
        return shift.unsqueeze(1) + (scale.unsqueeze(1) + 1) * F.layer_norm(x, (16,), None, None, 1e-6)


@pytest.mark.parametrize("module", [DiffusersModulate(), ContinuousModulate(), HandModulate()], ids=type)
def test_layernorm_modulate_forms(module):
    counts, expected, got = _rewritten(module, *_inputs())
    assert counts["layernorm_modulate"] == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class AffineModulate(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16, eps=1e-6)  # affine: not the op's math

    def forward(self, x, shift, scale):
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class PerTokenModulate(nn.Module):
    def forward(self, x, shift, scale):
        per_token = x * 0.5  # [B, L, C]: not a per-sample vector
        return F.layer_norm(x, (16,), eps=1e-6) * (1 + per_token) + shift[:, None]


class TwoPlusModulate(nn.Module):
    def forward(self, x, shift, scale):
        return F.layer_norm(x, (16,), eps=1e-6) * (2 + scale[:, None]) + shift[:, None]


@pytest.mark.parametrize("module", [AffineModulate(), PerTokenModulate(), TwoPlusModulate()], ids=type)
def test_layernorm_modulate_near_misses_are_left_alone(module):
    counts, expected, got = _rewritten(module, *_inputs())
    assert counts["layernorm_modulate"] == 0
    torch.testing.assert_close(got, expected)


class DiffusersResidual(nn.Module):  # x = x + gate.unsqueeze(1) * y, then norm2 modulate
    def forward(self, x, shift, scale):
        y = x.flip(1)
        r = x + scale.unsqueeze(1) * y
        return r, F.layer_norm(r, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def test_gated_residual_feeding_a_modulated_norm_becomes_one_op():
    counts, expected, got = _rewritten(DiffusersResidual(), *_inputs())
    assert counts == {
        "layernorm_modulate": 1,
        "gated_residual": 1,
        "gated_residual_layernorm_modulate": 1,
        "qk_norm_rope": 0,
        "qk_norm": 0,
        "bias_gelu_tanh": 0,
        "groupnorm_silu": 0,
    }
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class GatedOnly(nn.Module):
    def forward(self, x, shift, scale):
        return x + (shift[:, None] * x.flip(1)), x + shift[:, None] * scale[:, None]  # second: not [B, L, C]


def test_gated_residual_alone_and_a_near_miss():
    counts, expected, got = _rewritten(GatedOnly(), *_inputs())
    assert counts["gated_residual"] == 1
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)


class FeedForward(nn.Module):  # diffusers GELU(approximate="tanh") projection, and one without bias
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.nobias = nn.Linear(16, 32, bias=False)

    def forward(self, x, shift, scale):
        exact = F.gelu(self.proj(x))  # erf GELU: not the op
        return F.gelu(self.proj(x), approximate="tanh"), F.gelu(self.nobias(x), approximate="tanh"), exact


def test_bias_gelu_tanh_only_for_tanh_with_bias():
    counts, expected, got = _rewritten(FeedForward(), *_inputs())
    assert counts["bias_gelu_tanh"] == 1
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


class VaeNormAct(nn.Module):  # diffusers ResnetBlock2D: norm1 then nonlinearity
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 16, eps=1e-6)
        self.act = nn.SiLU()
        self.plain = nn.GroupNorm(4, 16, eps=1e-6, affine=False)

    def forward(self, x):
        return self.act(self.norm(x)), F.silu(self.plain(x))


def test_groupnorm_silu():
    x = torch.randn(2, 16, 6, 5)
    counts, expected, got = _rewritten(VaeNormAct(), x)
    assert counts["groupnorm_silu"] == 1  # the affine one
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_report_accumulates_until_reset():
    fc.reset()
    _rewritten(DiffusersModulate(), *_inputs())
    _rewritten(HandModulate(), *_inputs())
    assert fc.report()["layernorm_modulate"] == 2
    fc.reset()
    assert set(fc.report().values()) == {0}


class DiffusersJointAttention(nn.Module):
    """diffusers' FluxAttnProcessor math with diffusers' own RMSNorm and apply_rotary_emb: two
    streams' q, k, v projections, heads, per-stream qk RMSNorm, cat, RoPE, SDPA."""

    def __init__(self, heads=2, d=16, spelled_out=False, eps=(1e-6, 1e-6)):
        super().__init__()
        from diffusers.models.normalization import RMSNorm

        c = heads * d
        self.heads = heads
        self.proj = nn.ModuleList(nn.Linear(c, c) for _ in range(6))  # q, k, v of txt then img
        self.norms = nn.ModuleList(RMSNorm(d, eps=e) for e in (*eps, *eps))  # q, k of txt then img
        with torch.no_grad():
            for n in self.norms:
                n.weight.copy_(1 + 0.2 * torch.randn(d))
        if spelled_out:  # diffusers' other RMSNorm branch (SD3): the fp32 variance written out
            for n in self.norms:
                n.forward = lambda x, n=n: (
                    (x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + n.eps)) * n.weight
                )

    def forward(self, txt, img, cos, sin):
        from diffusers.models.embeddings import apply_rotary_emb

        q_t, k_t, v_t, q_i, k_i, v_i = (p(x).unflatten(-1, (self.heads, -1)) for p, x in
                                         zip(self.proj, (txt, txt, txt, img, img, img), strict=True))  # fmt: skip
        q_t, k_t, q_i, k_i = (n(x) for n, x in zip(self.norms, (q_t, k_t, q_i, k_i), strict=True))
        q, k, v = torch.cat([q_t, q_i], 1), torch.cat([k_t, k_i], 1), torch.cat([v_t, v_i], 1)
        q = apply_rotary_emb(q, (cos, sin), sequence_dim=1)
        k = apply_rotary_emb(k, (cos, sin), sequence_dim=1)
        out = F.scaled_dot_product_attention(q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))
        return out.permute(0, 2, 1, 3).flatten(2)


def _rope_inputs(interleaved=True, d=16, tokens=(3, 8)):
    g = torch.Generator().manual_seed(5)
    txt, img = (torch.randn(2, n, 32, generator=g) for n in tokens)
    angles = torch.rand(sum(tokens), d // 2, generator=g, dtype=torch.float64) * 20
    if interleaved:  # diffusers' FluxPosEmbed: each angle twice, built in the graph
        return txt, img, angles.cos(), angles.sin()
    return txt, img, torch.randn(sum(tokens), d, generator=g), torch.randn(sum(tokens), d, generator=g)


class WithTables(nn.Module):
    """The tables built inside the graph as FluxPosEmbed builds them (repeat_interleave, float, cat);
    ``interleaved=False`` hands over arbitrary [L, D] tables instead (not pairwise equal)."""

    def __init__(self, attention, interleaved=True):
        super().__init__()
        self.attention, self.interleaved = attention, interleaved

    def forward(self, txt, img, cos, sin):
        if self.interleaved:
            cos = torch.cat([cos[:, :3].repeat_interleave(2, dim=1).float(),
                             cos[:, 3:].repeat_interleave(2, dim=1).float()], dim=-1)  # fmt: skip
            sin = torch.cat([sin[:, :3].repeat_interleave(2, dim=1).float(),
                             sin[:, 3:].repeat_interleave(2, dim=1).float()], dim=-1)  # fmt: skip
        return self.attention(txt, img, cos, sin)


@pytest.mark.parametrize("spelled_out", [False, True], ids=["torch.rms_norm", "variance-form"])
def test_diffusers_joint_attention_inputs_become_one_op(spelled_out):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    counts, expected, got = _rewritten(WithTables(DiffusersJointAttention(spelled_out=spelled_out)), *_rope_inputs())
    assert counts["qk_norm_rope"] == 1 and counts["qk_norm"] == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["tables-not-interleaved", "eps-differs"],
)
def test_attention_near_misses_are_left_alone(case):
    """Arbitrary [L, D] tables do not rotate pairs by one angle, and one eps per op: not rewritten."""
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if case == "tables-not-interleaved":
        module = WithTables(DiffusersJointAttention(), interleaved=False)
        inputs = _rope_inputs(interleaved=False)
    else:
        module = WithTables(DiffusersJointAttention(eps=(1e-6, 1e-5)))
        inputs = _rope_inputs()
    counts, expected, got = _rewritten(module, *inputs)
    assert counts["qk_norm_rope"] == 0
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_bfl_joint_attention_inputs_become_one_op():
    """The BFL reference's form: fused qkv split by einops, QKNorm, joint cat, apply_rope with the
    EmbedND rotation matrices."""
    pytest.importorskip("einops")
    from fastflow.models.flux import make_img_ids

    from ._bfl import DoubleAttention

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    ids = torch.cat([torch.zeros(3, 3), make_img_ids(2, 4)])[None]
    counts, expected, got = _rewritten(
        DoubleAttention(), torch.randn(1, 8, 32, generator=g), torch.randn(1, 3, 32, generator=g), ids
    )
    assert counts["qk_norm_rope"] == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
