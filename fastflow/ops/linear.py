"""``ops.linear(x, layer, epilogue)``: the one way models run a linear layer (with an optional fused
epilogue), dispatched on the layer's type.

Layer types register their implementation with :func:`register_linear` (FP8 and LoRA layers plug
in here). A layer whose class overrides ``forward`` without registering, or that carries forward
hooks, runs through its own ``forward`` followed by the epilogue op: a swapped layer is honoured on
every device and backend, never bypassed by a fused path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ._registry import kernel_would_run
from .gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
from .gelu_tanh import bias_gelu_tanh, gelu_tanh
from .layernorm_modulate import layernorm_modulate

EPILOGUES: dict[str | None, Callable | None] = {None: None, "gelu_tanh": gelu_tanh}
_IMPLS: dict[type, Callable] = {}
_MODULATED_IMPLS: dict[type, Callable] = {}
_GATED_IMPLS: dict[type, Callable] = {}
_GELU_INPUT_IMPLS: dict[type, Callable] = {}


def _registrar(table: dict[type, Callable], cls: type):
    def register(fn):
        table[cls] = fn
        return fn

    return register


def register_linear(cls: type):
    """Decorator: ``fn(x, layer, epilogue) -> Tensor`` runs layers of type ``cls`` (and subclasses
    that do not override ``forward``)."""
    return _registrar(_IMPLS, cls)


def register_modulated_linear(cls: type):
    """Decorator: ``fn(x, shift, scale, eps, layer, epilogue) -> Tensor`` runs
    :func:`modulated_linear` for layers of type ``cls`` (e.g. FP8 layers fuse the LayerNorm with
    their activation quantization); unregistered types run LayerNorm-modulate, then :func:`linear`."""
    return _registrar(_MODULATED_IMPLS, cls)


def register_gated_modulated_linear(cls: type):
    """Decorator: ``fn(x, gate, y, shift, scale, eps, layer, epilogue) -> (r, out)`` runs
    :func:`gated_residual_modulated_linear` for layers of type ``cls``."""
    return _registrar(_GATED_IMPLS, cls)


def register_gelu_input(cls: type):
    """Register ``fn(h, layer, first)`` for layers of ``cls`` whose input stage can apply the GELU
    (an FP8 layer's quantizer): it returns layer(gelu_tanh(h)), or NotImplemented when ``h`` is
    None and the move would not pay for ``first``, the layer before (:func:`gelu_moves_into`)."""
    return _registrar(_GELU_INPUT_IMPLS, cls)


def _check_epilogue(epilogue: str | None) -> None:
    if epilogue not in EPILOGUES:
        raise InputError(f"unknown linear epilogue {epilogue!r}; choose one of {sorted(map(str, EPILOGUES))}")


def _apply_epilogue(y: torch.Tensor, epilogue: str | None) -> torch.Tensor:
    return y if epilogue is None else EPILOGUES[epilogue](y)


def _via_forward(x: torch.Tensor, layer: nn.Module, epilogue: str | None) -> torch.Tensor:
    return _apply_epilogue(layer(x), epilogue)


def implementation(layer: nn.Module, table: dict[type, Callable] | None = None, default: Callable = _via_forward):
    """The function :func:`linear` (or, with its table, :func:`modulated_linear`) runs for ``layer``."""
    table = _IMPLS if table is None else table
    if layer._forward_hooks or layer._forward_pre_hooks:
        return default
    cls = type(layer)
    for base in cls.__mro__:
        if base in table:
            return table[base] if cls.forward is base.forward else default
    return default


def linear(x: torch.Tensor, layer: nn.Module, epilogue: str | None = None) -> torch.Tensor:
    """epilogue(layer(x)). x [..., in]; epilogue None or "gelu_tanh"; returns [..., out]."""
    _check_epilogue(epilogue)
    return implementation(layer)(x, layer, epilogue)


def _modulated_via_linear(x, shift, scale, eps, layer, epilogue):
    return linear(layernorm_modulate(x, shift, scale, eps), layer, epilogue)


def modulated_linear(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    layer: nn.Module,
    epilogue: str | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """epilogue(layer((1 + scale) * LN(x) + shift)). x [B, L, C]; shift, scale [B, C]; returns [B, L, out].
    The same numbers as ``linear(layernorm_modulate(x, shift, scale, eps), layer, epilogue)``."""
    _check_epilogue(epilogue)
    fn = implementation(layer, _MODULATED_IMPLS, _modulated_via_linear)
    return fn(x, shift, scale, eps, layer, epilogue)


def _gated_via_linear(x, gate, y, shift, scale, eps, layer, epilogue):
    r, h = gated_residual_layernorm_modulate(x, gate, y, shift, scale, eps)
    return r, linear(h, layer, epilogue)


def gated_residual_modulated_linear(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    layer: nn.Module,
    epilogue: str | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sub-block boundary feeding a linear layer: r = x + gate * y and
    epilogue(layer((1 + scale) * LN(r) + shift)). x, y [B, L, C]; gate, shift, scale [B, C].
    Returns (r, out); the same numbers as gated_residual_layernorm_modulate then :func:`linear`."""
    _check_epilogue(epilogue)
    fn = implementation(layer, _GATED_IMPLS, _gated_via_linear)
    return fn(x, gate, y, shift, scale, eps, layer, epilogue)


def _no_gelu_input(h, layer, first):
    return NotImplemented


def gelu_moves_into(layer: nn.Module, first: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer(gelu_tanh(first(x)))`` runs best as :func:`gelu_linear` of ``first(x)``:
    ``layer``'s input stage takes the GELU (FP8: GELU + quantize in one pass), so ``first`` runs
    without an epilogue (FP8: through torch._scaled_mm) and no byte is lost."""
    fn = implementation(layer, _GELU_INPUT_IMPLS, _no_gelu_input)
    return fn(None, layer, (first, x)) is not NotImplemented


def gelu_linear(h: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """layer(gelu_tanh(h)), h [..., in]: the GELU in ``layer``'s input stage where it has one."""
    out = implementation(layer, _GELU_INPUT_IMPLS, _no_gelu_input)(h, layer, None)
    return linear(gelu_tanh(h), layer) if out is NotImplemented else out


def gelu_mlp(x: torch.Tensor, first: nn.Module, second: nn.Module) -> torch.Tensor:
    """second(gelu_tanh(first(x))): the GELU in first's epilogue, or in second's input stage where
    that pays (:func:`gelu_moves_into`). x [..., C] -> [..., C_out]."""
    if gelu_moves_into(second, first, x):
        return gelu_linear(linear(x, first), second)
    return linear(linear(x, first, "gelu_tanh"), second)


def gated_residual_gelu_mlp(x, gate, y, shift, scale, first: nn.Module, second: nn.Module, eps: float = 1e-6):
    """r = x + gate * y and :func:`gelu_mlp` of r's modulated LayerNorm: (r, out), [B, L, C] each
    (the sub-block boundary in one op; FP8 layers also quantize there)."""
    if gelu_moves_into(second, first, x):
        r, h = gated_residual_modulated_linear(x, gate, y, shift, scale, first, None, eps)
        return r, gelu_linear(h, second)
    r, h = gated_residual_modulated_linear(x, gate, y, shift, scale, first, "gelu_tanh", eps)
    return r, linear(h, second)


def gemm_gelu_epilogue(x: torch.Tensor, layer: nn.Linear) -> bool:
    """Whether bias + GELU(tanh) run inside the GEMM: cuBLASLt's epilogue through
    ``torch._addmm_activation`` (on CUDA its GELU is the tanh form, torch._decomp says so), for
    fp16 / bf16 on CUDA where the kernels run. Saves the activation pass: one read and one write of
    the [tokens, 4C] output (FLUX's MLP up-projections)."""
    return (
        x.is_cuda
        and x.dtype in (torch.float16, torch.bfloat16)
        and layer.bias is not None
        and layer.weight.dtype == x.dtype
        and kernel_would_run("bias_gelu_tanh", x)
    )


def linear_gelu_gemm(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """GELU_tanh(x @ W^T + b) in one GEMM with the activation in its epilogue (CUDA only: on CPU
    torch._addmm_activation applies the erf GELU)."""
    out = torch._addmm_activation(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], layer.weight.shape[0])


@register_linear(nn.Linear)
def _nn_linear(x: torch.Tensor, layer: nn.Linear, epilogue: str | None) -> torch.Tensor:
    # Where the kernels run, bias + GELU go into the GEMM's epilogue (CUDA) or at least into one
    # activation kernel (one pass fewer); elsewhere (CPU, the reference backend, training) the
    # plain Linear + GELU of the references.
    if epilogue == "gelu_tanh" and gemm_gelu_epilogue(x, layer):
        return linear_gelu_gemm(x, layer)
    if epilogue == "gelu_tanh" and layer.bias is not None and kernel_would_run("bias_gelu_tanh", x):
        return bias_gelu_tanh(F.linear(x, layer.weight), layer.bias)
    return _apply_epilogue(F.linear(x, layer.weight, layer.bias), epilogue)
