"""fastflow::attention_gelu_concat: [merge_heads(attn) | GELU_tanh(mlp)], the single block's
linear2 input in one pass: no copy of the strided MLP slice, no merge_heads copy, no torch.cat."""

from ..errors import InputError
from ._registry import defop
from .reference import attention_gelu_concat_ref


def _check(attn, mlp):
    if attn.dim() != 4 or mlp.dim() != 3 or mlp.shape[:2] != (attn.shape[0], attn.shape[2]):
        raise InputError(
            "attention_gelu_concat takes attn [B, H, L, D] and mlp [B, L, M], "
            f"got {list(attn.shape)} and {list(mlp.shape)}"
        )
    if mlp.dtype != attn.dtype:
        raise InputError(f"attn and mlp must share a dtype, got {attn.dtype} and {mlp.dtype}")


def _fake(attn, mlp):
    b, h, seq, d = attn.shape
    return attn.new_empty((b, seq, h * d + mlp.shape[-1]))


attention_gelu_concat = defop(
    "attention_gelu_concat",
    attention_gelu_concat_ref,
    _fake,
    impls={"triton": "fastflow.kernels.attention_gelu_concat:attention_gelu_concat_fwd"},
    check=_check,
)
