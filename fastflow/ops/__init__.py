"""fastflow ops: the only place that talks to torch.library.

Every op is a ``fastflow::<name>`` custom op whose body is the plain-torch reference (so it runs on
any device, passes opcheck and traces under torch.compile); GPU kernels register themselves for
"cuda" on top. The wrappers below read the backend switch at call time.
"""

from ._backend import BACKENDS, get_backend, set_backend, use_backend
from .attention import attention
from .bias_gelu_tanh import bias_gelu_tanh
from .gated_residual import gated_residual
from .gated_residual_layernorm_modulate import gated_residual_layernorm_modulate
from .gelu_tanh import gelu_tanh
from .groupnorm_silu import groupnorm_silu
from .layernorm_modulate import layernorm_modulate
from .qk_norm import qk_norm
from .qk_norm_rope import qk_norm_rope

__all__ = [
    "BACKENDS",
    "attention",
    "bias_gelu_tanh",
    "gated_residual",
    "gated_residual_layernorm_modulate",
    "gelu_tanh",
    "get_backend",
    "groupnorm_silu",
    "layernorm_modulate",
    "qk_norm",
    "qk_norm_rope",
    "set_backend",
    "use_backend",
]
