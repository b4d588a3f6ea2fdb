"""fastflow ops: the only place that talks to torch.library.

Every op is declared once in :mod:`fastflow.ops._registry` (:data:`OPS`): a ``fastflow::<name>``
custom op whose body is the plain-torch reference (so it runs on any device, passes opcheck and
traces under torch.compile), with GPU kernels registered for "cuda" on top and a wrapper that reads
the backend switch at call time. :func:`linear` runs linear layers, dispatched on their type.
"""

from ._registry import BACKENDS, KERNEL_BACKENDS, OPS, get_backend, kernel_would_run, set_backend, use_backend
from .attention import attention
from .attention_gelu_concat import attention_gelu_concat
from .fp8 import (
    fp8_linear,
    fp8_quantize,
    fp8_scaled_mm,
    gated_residual_layernorm_modulate_fp8,
    layernorm_modulate_fp8,
)
from .gated_residual import gated_residual
from .gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
from .geglu import geglu
from .gelu_tanh import bias_gelu_tanh, gelu_tanh
from .groupnorm_silu import groupnorm_silu
from .int8 import (
    gated_residual_layernorm_modulate_int8,
    int8_linear,
    int8_quantize,
    int8_scaled_mm,
    layernorm_modulate_int8,
)
from .layernorm_modulate import layernorm_modulate
from .linear import (
    gated_residual_gelu_mlp,
    gated_residual_modulated_linear,
    gelu_linear,
    gelu_mlp,
    gelu_moves_into,
    linear,
    modulated_linear,
    register_gated_modulated_linear,
    register_gelu_input,
    register_linear,
    register_modulated_linear,
)
from .qk_norm_rope import joint_qk_norm_rope, joint_qkv_norm_rope, qk_norm, qk_norm_rope, qkv_norm_rope
from .sequence_parallel import CommRecord, SequenceParallel, attention_lse, count_comm, sp_attention

__all__ = [
    "BACKENDS",
    "CommRecord",
    "KERNEL_BACKENDS",
    "OPS",
    "SequenceParallel",
    "attention",
    "attention_gelu_concat",
    "attention_lse",
    "bias_gelu_tanh",
    "count_comm",
    "fp8_linear",
    "fp8_quantize",
    "fp8_scaled_mm",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "gated_residual_layernorm_modulate_fp8",
    "gated_residual_layernorm_modulate_int8",
    "gated_residual_gelu_mlp",
    "gated_residual_modulated_linear",
    "geglu",
    "gelu_linear",
    "gelu_mlp",
    "gelu_moves_into",
    "gelu_tanh",
    "get_backend",
    "groupnorm_silu",
    "int8_linear",
    "int8_quantize",
    "int8_scaled_mm",
    "kernel_would_run",
    "layernorm_modulate",
    "layernorm_modulate_fp8",
    "layernorm_modulate_int8",
    "linear",
    "modulated_linear",
    "joint_qk_norm_rope",
    "joint_qkv_norm_rope",
    "qk_norm",
    "qk_norm_rope",
    "qkv_norm_rope",
    "register_gated_modulated_linear",
    "register_gelu_input",
    "register_linear",
    "register_modulated_linear",
    "set_backend",
    "sp_attention",
    "use_backend",
]
