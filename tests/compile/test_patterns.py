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
