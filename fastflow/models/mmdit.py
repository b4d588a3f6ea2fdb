"""SD3 / SD3.5 MMDiT and MMDiT-X in the official SAI layout (sd3.5 ``mmditx.py`` names).

Latents [B, 16, h, w] -> velocity [B, 16, h, w]. Math: REFERENCE.md sections 2.7-2.8. Hot
expressions go through ``fastflow.ops``; the SAI reference's class names are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import MMDiTConfig
from .layers import GELUTanh, merge_heads, timestep_embedding
from .modulation import modulation


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, (h/p)(w/p), hidden]


class Embedder(nn.Module):
    """Linear -> SiLU -> Linear (SAI TimestepEmbedder / VectorEmbedder: ``mlp.0``, ``mlp.2``)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class RMSNorm(nn.Module):
    """Holds the learnable ``weight`` of ln_q / ln_k; the math runs inside ops.qk_norm."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = None if pre_only else nn.Linear(dim, dim)
        self.ln_q = RMSNorm(dim // num_heads) if qk_norm else None
        self.ln_k = RMSNorm(dim // num_heads) if qk_norm else None

    def pre_attention(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        """x [B, L, C] (its modulated LayerNorm feeds qkv) -> the fused qkv [B, L, 3C]."""
        return ops.modulated_linear(x, shift, scale, self.qkv)

    @property
    def norm_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (
            self.ln_q.weight if self.ln_q is not None else None,
            self.ln_k.weight if self.ln_k is not None else None,
        )

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qkv [B, L, 3C] -> q, k, v [B, H, L, D], q / k RMS-normalised where the model has ln_q / ln_k."""
        return ops.qk_norm(qkv, *self.norm_scales, self.num_heads, 1e-6)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = GELUTanh()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_mlp(x, self.fc1, self.fc2)

    def after_residual(self, x, gate, y, shift, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """r = x + gate * y, and the MLP of r's modulated LayerNorm: (r, mlp_out), [B, L, C] each."""
        return ops.gated_residual_gelu_mlp(x, gate, y, shift, scale, self.fc1, self.fc2)


class DismantledBlock(nn.Module):
    """One stream of a joint block. ``pre_only``: the last context block (qkv only, 2 chunks);
    ``x_block_self_attn``: MMDiT-X (an image-only attn2, 9 chunks)."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, x_block_self_attn: bool = False):
        super().__init__()
        hidden = cfg.hidden_size
        self.pre_only = pre_only
        self.attn = SelfAttention(hidden, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, pre_only)
        self.attn2 = SelfAttention(hidden, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm) if x_block_self_attn else None
        self.mlp = None if pre_only else Mlp(hidden, cfg.mlp_hidden)
        self.n_mod = 2 if pre_only else (9 if x_block_self_attn else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.n_mod * hidden, bias=True))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """Returns the fused qkv [B, L, 3C] of attn, (q2, k2, v2) of attn2 or None, and the
        modulation chunks."""
        mod = modulation(self.adaLN_modulation[1], c).chunk(self.n_mod, dim=-1)
        qkv = self.attn.pre_attention(x, mod[0], mod[1])
        # attn2 reads the same LN(x) as attn, before any residual (REFERENCE.md 2.7).
        qkv2 = self.attn2.heads(self.attn2.pre_attention(x, mod[6], mod[7])) if self.attn2 else None
        return qkv, qkv2, mod

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, attn2: torch.Tensor | None, mod) -> torch.Tensor:
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        if attn2 is None:
            proj = ops.linear(attn, self.attn.proj)
            x, mlp = self.mlp.after_residual(x, gate_msa, proj, shift_mlp, scale_mlp)
        else:
            x = ops.gated_residual(x, gate_msa, ops.linear(attn, self.attn.proj))
            proj2 = ops.linear(attn2, self.attn2.proj)
            x, mlp = self.mlp.after_residual(x, mod[8], proj2, shift_mlp, scale_mlp)
        return ops.gated_residual(x, gate_mlp, mlp)


class JointBlock(nn.Module):
    def __init__(self, cfg: MMDiTConfig, index: int, pre_only: bool | None = None):
        super().__init__()
        pre_only = index == cfg.depth - 1 if pre_only is None else pre_only  # a ControlNet's: never
        self.context_block = DismantledBlock(cfg, pre_only=pre_only)
        self.x_block = DismantledBlock(cfg, x_block_self_attn=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        n_ctx = context.shape[1]
        ctx_qkv, _, ctx_mod = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mod = self.x_block.pre_attention(x, c)
        # joint attention over [context ; x], no RoPE: both streams' q, k, v written into one set
        ctx_attn, x_attn = self.context_block.attn, self.x_block.attn
        q, k, v = ops.joint_qk_norm_rope(
            ctx_qkv, x_qkv, *ctx_attn.norm_scales, *x_attn.norm_scales, None, None, x_attn.num_heads, 1e-6
        )
        attn = merge_heads(self.attention(q, k, v))
        attn2 = merge_heads(self.attention_x(*x_qkv2)) if x_qkv2 is not None else None
        x = self.x_block.post_attention(x, attn[:, n_ctx:], attn2, x_mod)
        if self.context_block.pre_only:
            return None, x
        return self.context_block.post_attention(context, attn[:, :n_ctx], None, ctx_mod), x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The joint [context ; x] attention, [B, H, L, D]; one method so a context-parallel wrapper
        can replace it."""
        return ops.attention(q, k, v)

    def attention_x(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """MMDiT-X's image-only attention (attn2) over x's tokens; its own method because a
        context-parallel wrapper splits it over other token counts than the joint one."""
        return ops.attention(q, k, v)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation(self.adaLN_modulation[1], c).chunk(2, dim=-1)  # official order: shift first
        return ops.modulated_linear(x, shift, scale, self.linear)


@dataclass
class MMDiTState:
    """What the block loop carries: x [B, h_p*w_p, C], context [B, L, C] (None after the last,
    pre-only, context block), c [B, C] and the patch grid."""

    x: torch.Tensor
    context: torch.Tensor | None
    c: torch.Tensor
    h_p: int
    w_p: int
    tokens: torch.Tensor | None = None  # the image tokens x holds when not all (region-adaptive sampling)


def build_trunk(module: nn.Module, c: MMDiTConfig, pre_only: bool | None = None) -> None:
    """The MMDiT's embedders, position table and ``depth`` joint blocks as attributes of ``module``
    (SAI's names; ``pre_only``: JointBlock's, None: the last block's text stream ends early):
    :class:`MMDiT` and the SD3 ControlNet build theirs so."""
    module.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.hidden_size)
    module.t_embedder = Embedder(256, c.hidden_size)
    module.y_embedder = Embedder(c.adm_in_dim, c.hidden_size)
    module.context_embedder = nn.Linear(c.context_in_dim, c.hidden_size)
    # Stored in every checkpoint and always loaded, never recomputed (REFERENCE.md 7.12).
    module.register_buffer("pos_embed", torch.zeros(1, c.pos_embed_max_size**2, c.hidden_size), persistent=True)
    module.joint_blocks = nn.ModuleList(JointBlock(c, i, pre_only) for i in range(c.depth))


class MMDiT(nn.Module):
    """SD3 / SD3.5 transformer: x [B, 16, h, w] latents -> velocity of the same shape."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        build_trunk(self, c)
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.bias.dtype  # the bias stays in the model dtype when weights are FP8

    def check_size(self, h: int, w: int) -> None:
        """Raise a clear error for latent sizes this model cannot take (h, w in latent pixels)."""
        p, limit = self.config.patch_size, self.config.pos_embed_max_size
        if h % p or w % p:
            raise InputError(
                f"latent size {h}x{w} must be a multiple of the patch size {p} (image size a multiple of {8 * p})"
            )
        if h // p > limit or w // p > limit:
            raise InputError(
                f"{self.config.name}: a {h}x{w} latent ({8 * h}x{8 * w} px) is a {h // p}x{w // p} patch grid, "
                f"beyond the stored position embedding's {limit}x{limit} (at most {8 * p * limit} px per side); "
                "use a smaller size"
            )

    def cropped_pos_embed(self, h_p: int, w_p: int) -> torch.Tensor:
        """Centre crop of the stored pos_embed to an h_p x w_p patch grid -> [1, h_p*w_p, C]."""
        m = self.config.pos_embed_max_size
        top, left = (m - h_p) // 2, (m - w_p) // 2
        grid = self.pos_embed.reshape(1, m, m, -1)[:, top : top + h_p, left : left + w_p, :]
        return grid.reshape(1, h_p * w_p, -1)

    def unpatchify(self, x: torch.Tensor, h_p: int, w_p: int) -> torch.Tensor:
        """[B, h_p*w_p, p*p*c] with feature index (p*P + q)*c_out + c -> [B, c, h_p*P, w_p*P]."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h_p, w_p, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h_p * p, w_p * p)

    @property
    def num_blocks(self) -> int:
        return len(self.joint_blocks)

    def embed(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor, tokens=None
    ) -> MMDiTState:
        """Inputs as :meth:`forward` -> the state before the first joint block. ``tokens``: only these
        image tokens [k] go on (region-adaptive sampling, fastflow/caching/ras.py), each with its
        position embedding already added; :meth:`final` then returns their per-token outputs."""
        if x.ndim != 4 or context.ndim != 3 or y.ndim != 2:
            raise InputError(
                f"x must be [B, C, h, w], context [B, L, C], y [B, C]; got {list(x.shape)}, "
                f"{list(context.shape)}, {list(y.shape)}"
            )
        h, w = x.shape[-2:]
        self.check_size(h, w)
        p = self.config.patch_size
        h_p, w_p = h // p, w // p
        dtype = self.dtype
        x = self.x_embedder(x.to(dtype)) + self.cropped_pos_embed(h_p, w_p).to(dtype)
        if tokens is not None:
            x = x[:, tokens]
        c = self.conditioning(timesteps, y)
        return MMDiTState(x, self.context_embedder(context.to(dtype)), c, h_p, w_p, tokens)

    def conditioning(self, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c [B, C], the adaLN input of every block, from timesteps [B] (sigma * 1000, fp32) and
        pooled text y [B, 2048]."""
        dtype = self.dtype
        return self.t_embedder(timestep_embedding(timesteps.float()).to(dtype)) + self.y_embedder(y.to(dtype))

    def blocks(
        self, state: MMDiTState, start: int = 0, end: int | None = None, skip_layers=None, controls=None
    ) -> MMDiTState:
        """Run joint blocks ``start`` .. ``end - 1`` on ``state`` in place, leaving out ``skip_layers``.
        ``controls``: a ControlNet's residuals [B, h_p*w_p, C], added to x after each block but the
        pre-only last, block i taking residual ``int(i / (blocks / len(controls)))`` (diffusers)."""
        skip = set(skip_layers or ())
        for i in range(start, self.num_blocks if end is None else end):
            if i not in skip:
                state.context, state.x = self.joint_blocks[i](state.context, state.x, state.c)
            if controls is not None and not self.joint_blocks[i].context_block.pre_only:
                state.x = state.x + controls[int(i / (self.num_blocks / len(controls)))]
        return state

    def final(self, state: MMDiTState) -> torch.Tensor:
        """Velocity [B, 16, h, w] from the state after the last block (with ``state.tokens``: the
        kept tokens' outputs [B, k, p * p * 16], not unpatchified)."""
        out = self.final_layer(state.x, state.c)
        return out if state.tokens is not None else self.unpatchify(out, state.h_p, state.w_p)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        skip_layers: tuple[int, ...] | list[int] | None = None,
        controls: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x [B, 16, h, w]; timesteps [B] = sigma * 1000 (fp32); context [B, L, 4096]; y [B, 2048]
        pooled; ``skip_layers``: joint blocks to skip entirely (skip-layer guidance); ``controls``:
        ControlNet residuals (:meth:`blocks`). Same as ``final(blocks(embed(...), ...))``."""
        state = self.embed(x, timesteps, context, y)
        return self.final(self.blocks(state, skip_layers=skip_layers, controls=controls))
