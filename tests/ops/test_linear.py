"""ops.linear: dispatch on the layer's type; a swapped or hooked layer is never bypassed."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastflow.ops as ops
from fastflow.errors import InputError

BACKENDS = ["reference", "kernels", "triton"]


class LoraLinear(nn.Linear):
    """A LoRA-style layer (BFL flux's LinearLora shape): base Linear + scale * B(A(x))."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 1.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) + self.scale * self.up(self.down(x))


@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("epilogue", [None, "gelu_tanh"])
def test_plain_linear_matches_the_module(backend, epilogue):
    layer = nn.Linear(24, 40)
    x = torch.randn(2, 5, 24)
    expected = layer(x) if epilogue is None else F.gelu(layer(x), approximate="tanh")
    with ops.use_backend(backend):
        torch.testing.assert_close(ops.linear(x, layer, epilogue), expected)


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_a_subclass_that_overrides_forward_is_honoured(backend):
    layer = LoraLinear(nn.Linear(16, 32))
    x = torch.randn(3, 16)
    with ops.use_backend(backend):
        out = ops.linear(x, layer, "gelu_tanh")
    torch.testing.assert_close(out, F.gelu(layer(x), approximate="tanh"))
    assert (out - F.gelu(F.linear(x, layer.weight, layer.bias), approximate="tanh")).abs().max() > 0.1


def test_forward_hooks_are_honoured():
    layer = nn.Linear(8, 8)
    layer.register_forward_hook(lambda module, args, out: out * 0)
    with ops.use_backend("kernels"):
        assert ops.linear(torch.randn(2, 8), layer).abs().max() == 0
        assert ops.linear(torch.randn(2, 8), layer, "gelu_tanh").abs().max() == 0


def test_registered_layer_types_get_their_own_implementation():
    class Doubled(nn.Module):
        def forward(self, x):
            raise AssertionError("the registered implementation must run, not forward")

    seen = []

    @ops.register_linear(Doubled)
    def _run(x, layer, epilogue):
        seen.append(epilogue)
        return 2 * x

    assert torch.equal(ops.linear(torch.ones(2), Doubled(), "gelu_tanh"), torch.full((2,), 2.0))
    assert seen == ["gelu_tanh"]


def test_unknown_epilogue_is_a_clear_error():
    with pytest.raises(InputError, match="epilogue"):
        ops.linear(torch.randn(2, 4), nn.Linear(4, 4), "relu")


def test_gelu_epilogue_inside_the_gemm_plumbing(monkeypatch):
    """On CUDA, bias + GELU(tanh) run in the GEMM's epilogue (torch._addmm_activation). Its CUDA
    semantics (torch._decomp: addmm then the tanh GELU) stand in for cuBLASLt here, so the routing,
    the [B, L, C] reshape, the weight transpose and the bias are checked against the reference."""
    import importlib

    lin = importlib.import_module("fastflow.ops.linear")

    calls = []

    def addmm_gelu_like_cuda(bias, mat1, mat2, use_gelu):
        calls.append((mat1.shape, mat2.shape))
        return F.gelu(torch.addmm(bias, mat1, mat2), approximate="tanh")

    monkeypatch.setattr(torch, "_addmm_activation", addmm_gelu_like_cuda)
    monkeypatch.setattr(lin, "gemm_gelu_epilogue", lambda x, layer: True)
    layer = nn.Linear(8, 24)
    x = torch.randn(2, 5, 8)
    got = ops.linear(x, layer, "gelu_tanh")
    torch.testing.assert_close(got, F.gelu(layer(x), approximate="tanh"))
    assert calls == [((10, 8), (8, 24))]
    assert got.shape == (2, 5, 24)


def test_gelu_epilogue_gemm_only_on_cuda_half():
    from fastflow.ops.linear import gemm_gelu_epilogue

    layer = nn.Linear(8, 24).bfloat16()
    assert not gemm_gelu_epilogue(torch.randn(2, 8, dtype=torch.bfloat16), layer)  # CPU: torch's erf GELU
