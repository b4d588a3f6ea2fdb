"""The op registry: one declaration gives the custom op, its fake, per-backend kernels and dispatch."""

import inspect

import pytest
import torch

import fastflow.ops as ops
from fastflow.ops import _registry

CALLS = []


def _scale_ref(x: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """x * factor (the reference)."""
    CALLS.append("reference")
    return x * factor


def _scale_triton(x, factor):
    CALLS.append("triton")
    return x * factor


def _scale_cuda_cpp(x, factor):
    CALLS.append("cuda_cpp")
    return x * factor


scale = _registry.defop(
    "_test_scale",
    _scale_ref,
    lambda x, factor: torch.empty_like(x),
    impls={"triton": _scale_triton, "cuda_cpp": _scale_cuda_cpp},
)


def _run(backend, *args, **kwargs):
    CALLS.clear()
    with ops.use_backend(backend):
        out = scale(*args, **kwargs)
    return out, list(CALLS)


def test_the_declaration_makes_a_custom_op_that_passes_opcheck():
    assert "_test_scale" in ops.OPS and ops.OPS["_test_scale"].call is scale
    torch.library.opcheck(torch.ops.fastflow._test_scale.default, (torch.randn(3, 5), 3.0))
    assert inspect.signature(scale) == inspect.signature(_scale_ref) and scale.__doc__ == _scale_ref.__doc__


def test_every_backend_runs_its_own_implementation():
    x = torch.randn(4)
    expected = x * 3.0
    for backend, ran in [("reference", ["reference"]), ("triton", ["triton"]), ("cuda_cpp", ["cuda_cpp"])]:
        out, calls = _run(backend, x, 3.0)
        torch.testing.assert_close(out, expected)
        assert calls == ran, backend
    out, calls = _run("kernels", x, factor=3.0)  # CPU tensors: the custom op's body, the reference
    torch.testing.assert_close(out, expected)
    assert calls == ["reference"]


def test_defaults_and_keywords_are_filled_in():
    x = torch.ones(2)
    torch.testing.assert_close(_run("triton", x)[0], 2 * x)
    torch.testing.assert_close(_run("triton", x=x, factor=5.0)[0], 5 * x)
    with pytest.raises(TypeError, match="unexpected"):
        scale(x, 2.0, bogus=1)


def test_an_op_without_the_selected_backend_runs_its_reference():
    CALLS.clear()
    with ops.use_backend("cuda_cpp"):  # no shipped op has a cuda_cpp kernel yet
        out = ops.gelu_tanh(torch.randn(8))
    assert out.shape == (8,)


def test_grad_takes_the_reference_path():
    x = torch.randn(3, requires_grad=True)
    out, calls = _run("triton", x)
    out.sum().backward()
    assert calls == ["reference"] and torch.equal(x.grad, torch.full((3,), 2.0))


def test_the_cuda_kernel_is_the_first_available_backend(monkeypatch):
    opdef = ops.OPS["_test_scale"]
    monkeypatch.setattr(_registry, "_available", lambda backend: backend == "cuda_cpp")
    assert opdef.device_backend("cuda") == "cuda_cpp"
    monkeypatch.setattr(_registry, "_available", lambda backend: True)
    assert opdef.device_backend("cuda") == "triton"
    monkeypatch.setattr(_registry, "_available", lambda backend: False)
    assert opdef.device_backend("cuda") is None
    assert opdef.device_backend("cpu") is None


def test_kernel_would_run_follows_the_backend():
    x = torch.randn(2)
    with ops.use_backend("triton"):
        assert ops.kernel_would_run("_test_scale", x)
    with ops.use_backend("reference"):
        assert not ops.kernel_would_run("_test_scale", x)
    with ops.use_backend("kernels"):
        assert not ops.kernel_would_run("_test_scale", x)  # CPU tensor: the reference runs


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="already defined"):
        _registry.defop("_test_scale", _scale_ref, lambda x, factor: x)
    with pytest.raises(ValueError, match="unknown kernel backends"):
        _registry.defop("_test_bad", _scale_ref, lambda x, factor: x, impls={"rocm": _scale_triton})
    with pytest.raises(ValueError, match="unknown fastflow op backend"):
        ops.set_backend("cuda")


def test_the_table_lists_every_public_op_with_its_kernel_module():
    public = {"attention", "bias_gelu_tanh", "gated_residual", "gated_residual_layernorm_modulate", "gelu_tanh"}
    public |= {"groupnorm_silu", "layernorm_modulate", "qk_norm", "qk_norm_rope"}
    assert public <= set(ops.OPS)
    for name in public:
        assert getattr(ops, name) is ops.OPS[name].call
        assert all(m.startswith("fastflow.kernels.") for m in ops.OPS[name].kernel_modules())
