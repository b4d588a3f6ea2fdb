"""FLUX.1 transformer (dev, schnell, Kontext-dev) in the official BFL layout.

Module and parameter names follow black-forest-labs/flux ``model.py``/``layers.py`` one to one, so
official checkpoints load without renaming; hot expressions go through ``fastflow.ops``.
Math: REFERENCE.md section 2.1-2.6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .configs import FluxConfig
from .layers import GELUTanh, batch_shared_ids, merge_heads, timestep_embedding
from .modulation import Modulation, modulation

_FP16_MAX = 65504.0


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class EmbedND(nn.Module):
    """RoPE tables from integer-valued position ids: ids [L, n_axes] -> cos, sin [L, head_dim/2] fp32.

    Frequencies are built in fp64 (as diffusers does) and the tables returned in fp32, so positions
    stay exact at any resolution (diffusers' bf16 ids are exact only up to 256).
    """

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = tuple(axes_dim)
        self._last = None  # (ids, tables) of the previous eager call: every step of a generation asks again

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch_shared_ids(ids, len(self.axes_dim), "position ids")
        if torch.compiler.is_compiling():
            return self.tables(ids)
        last = self._last
        if (
            last is not None
            and last[0].shape == ids.shape
            and last[0].device == ids.device
            and torch.equal(last[0], ids)
        ):
            return last[1]
        tables = self.tables(ids)
        self._last = (ids.clone(), tables)
        return tables

    def tables(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [L, D/2] fp32 for ids [L, n_axes] (computed, never from the previous call)."""
        pos = ids.to(torch.float64)
        angles = []
        for axis, d in enumerate(self.axes_dim):
            omega = 1.0 / self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
            angles.append(pos[:, axis, None] * omega[None])  # [L, d/2]
        angle = torch.cat(angles, dim=-1)  # [L, D/2]
        return torch.cos(angle).float(), torch.sin(angle).float()


class RMSNorm(nn.Module):
    """Holds the learnable ``scale`` of a QK RMSNorm; the math runs inside ops.qk_norm_rope."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


def qk_norm_rope(qkv, norm: QKNorm, cos, sin, num_heads):
    return ops.qk_norm_rope(qkv, norm.query_norm.scale, norm.key_norm.scale, cos, sin, num_heads, 1e-6)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # FLUX activations overflow fp16 (diffusers PR #9097 clamps at the same places).
    return x.clamp(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear; indices 0 and 2 match the official img_mlp.0 / img_mlp.2.
    The GELU is the first linear's epilogue (its bias added inside the activation where a kernel runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_mlp(x, self[0], self[2])

    def after_residual(self, x, gate, y, shift, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """r = x + gate * y, and the MLP of r's modulated LayerNorm: (r, mlp_out), [B, L, C] each
        (the sub-block boundary in one op; FP8 layers also quantize there)."""
        return ops.gated_residual_gelu_mlp(x, gate, y, shift, scale, self[0], self[2])


def _mlp(hidden: int, mlp_hidden: int) -> MLP:
    return MLP(nn.Linear(hidden, mlp_hidden), GELUTanh(), nn.Linear(mlp_hidden, hidden))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden, double=True)
        self.img_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.img_mlp = _mlp(hidden, mlp_hidden)
        self.txt_mod = Modulation(hidden, double=True)
        self.txt_attn = SelfAttention(hidden, num_heads, qkv_bias)
        self.txt_mlp = _mlp(hidden, mlp_hidden)

    def forward(self, img, txt, vec, pe):
        """img [B, N, C], txt [B, T, C], vec [B, C]; pe = (cos, sin) [T + N, D/2] in [txt | img] order."""
        cos, sin = pe
        n_txt = txt.shape[1]
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        img_qkv = ops.modulated_linear(img, i_shift1, i_scale1, self.img_attn.qkv)
        txt_qkv = ops.modulated_linear(txt, t_shift1, t_scale1, self.txt_attn.qkv)
        # q, k, v of both streams normalised, rotated and written into one [B, H, T + N, D] set
        tn, im = self.txt_attn.norm, self.img_attn.norm
        q, k, v = ops.joint_qk_norm_rope(
            txt_qkv, img_qkv, tn.query_norm.scale, tn.key_norm.scale, im.query_norm.scale, im.key_norm.scale,
            cos, sin, self.num_heads, 1e-6,
        )  # fmt: skip
        attn = merge_heads(self.attention(q, k, v))  # [B, T + N, C] (a view of the attention output)
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        # attention residual and the MLP's modulated LN in one op (the sub-block boundary)
        img, img_mlp = self.img_mlp.after_residual(
            img, i_gate1, ops.linear(img_attn, self.img_attn.proj), i_shift2, i_scale2
        )
        img = ops.gated_residual(img, i_gate2, img_mlp)
        txt, txt_mlp = self.txt_mlp.after_residual(
            txt, t_gate1, ops.linear(txt_attn, self.txt_attn.proj), t_shift2, t_scale2
        )
        txt = ops.gated_residual(txt, t_gate2, txt_mlp)
        return img, _clamp_fp16(txt)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Joint attention over [txt | img] tokens, [B, H, L, D]; one method so a context-parallel
        wrapper can replace it."""
        return ops.attention(q, k, v)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.hidden = hidden
        self.num_heads = num_heads
        self.mlp_hidden = mlp_hidden
        self.linear1 = nn.Linear(hidden, hidden * 3 + mlp_hidden)  # [qkv | mlp]
        self.linear2 = nn.Linear(hidden + mlp_hidden, hidden)  # input [attn | gelu(mlp)]
        self.norm = QKNorm(hidden // num_heads)
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe):
        """x [B, T + N, C] (txt first), vec [B, C], pe = (cos, sin) [T + N, D/2]."""
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(
            ops.modulated_linear(x, shift, scale, self.linear1),
            [3 * self.hidden, self.mlp_hidden],
            dim=-1,
        )
        q, k, v = qk_norm_rope(qkv, self.norm, pe[0], pe[1], self.num_heads)
        # linear2's input [attn | GELU(mlp)] written in one pass (no merge_heads copy, no cat)
        out = ops.linear(ops.attention_gelu_concat(self.attention(q, k, v), mlp), self.linear2)
        return _clamp_fp16(ops.gated_residual(x, gate, out))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return ops.attention(q, k, v)


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = modulation(self.adaLN_modulation[1], vec).chunk(2, dim=-1)  # official order: shift first
        return ops.modulated_linear(x, shift, scale, self.linear)


@dataclass
class FluxState:
    """What the block loop carries: the streams, the conditioning and the token bookkeeping.

    Before the single blocks ``img`` [B, N (+ M Kontext context tokens), C] and ``txt`` [B, T, C]
    are separate; after the last double block they are joined into ``x`` [B, T + N (+ M), C].
    """

    img: torch.Tensor | None
    txt: torch.Tensor | None
    vec: torch.Tensor  # [B, C]
    pe: tuple[torch.Tensor, torch.Tensor]  # cos, sin [T + N (+ M), D/2] fp32
    n_txt: int
    n_img: int  # target image tokens (the output)
    x: torch.Tensor | None = None

    def joined(self) -> torch.Tensor:
        """The joint stream [B, T + N (+ M), C] (joins img and txt on first use)."""
        if self.x is None:
            self.x, self.img, self.txt = torch.cat((self.txt, self.img), dim=1), None, None
        return self.x


def build_trunk(module: nn.Module, c: FluxConfig) -> None:
    """The transformer's RoPE, embedders, ``depth`` double and ``depth_single_blocks`` single blocks
    as attributes of ``module`` (BFL's names): :class:`Flux` and the FLUX ControlNets build theirs so."""
    module.pe_embedder = EmbedND(c.head_dim, c.theta, c.axes_dim)
    module.img_in = nn.Linear(c.in_channels, c.hidden_size, bias=True)
    module.time_in = MLPEmbedder(256, c.hidden_size)
    module.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
    module.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else None
    module.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
    module.double_blocks = nn.ModuleList(
        DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden, c.qkv_bias) for _ in range(c.depth)
    )
    module.single_blocks = nn.ModuleList(
        SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_hidden) for _ in range(c.depth_single_blocks)
    )


class Flux(nn.Module):
    """The FLUX.1 transformer on packed latents: img [B, N, 64] -> velocity [B, N, 64]."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = c = config
        build_trunk(self, c)
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.bias.dtype  # the bias stays in the model dtype when weights are FP8

    def conditioning(self, timesteps: torch.Tensor, y: torch.Tensor, guidance: torch.Tensor | None):
        """vec [B, C] from t in [0, 1] [B], pooled CLIP y [B, vec_in] and guidance g [B].

        t and g are rounded to the model dtype before x1000, as both references do (REFERENCE.md 7.2).
        """
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps.to(dtype) * 1000))
        if self.guidance_in is not None:
            if guidance is None:
                raise InputError(f"{self.config.name} is guidance-distilled: pass guidance (e.g. 3.5) per sample")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype) * 1000))
        return vec + self.vector_in(y.to(dtype))

    @property
    def num_blocks(self) -> int:
        """Double blocks then single blocks, indexed 0 .. depth + depth_single_blocks - 1."""
        return len(self.double_blocks) + len(self.single_blocks)

    def embed(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        y: torch.Tensor,
        timesteps: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        img_cond: torch.Tensor | None = None,
        img_cond_ids: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> FluxState:
        """Inputs as :meth:`forward` -> the state before the first block (embedded streams, vec, RoPE).
        ``tokens``: only these target image tokens [k] go on (region-adaptive sampling,
        fastflow/caching/ras.py); the RoPE tables follow their position ids."""
        dtype = self.dtype
        if txt.ndim != 3 or img.ndim != 3 or txt.shape[0] != img.shape[0]:
            raise InputError(f"img must be [B, N, C] and txt [B, T, C]; got {list(img.shape)} and {list(txt.shape)}")
        n_img, n_txt = img.shape[1], txt.shape[1]
        img_ids = batch_shared_ids(img_ids, 3, "img_ids")
        txt_ids = (
            torch.zeros(n_txt, 3, device=img.device) if txt_ids is None else batch_shared_ids(txt_ids, 3, "txt_ids")
        )
        if img_cond is not None:
            if img_cond_ids is None:
                raise InputError("img_cond needs img_cond_ids (ids with index 1 on axis 0)")
            img = torch.cat((img, img_cond.to(img.dtype)), dim=1)
            img_ids = torch.cat((img_ids, batch_shared_ids(img_cond_ids, 3, "img_cond_ids").to(img_ids.dtype)), dim=0)
        if img_ids.shape[0] != img.shape[1] or txt_ids.shape[0] != n_txt:
            raise InputError(
                f"position ids do not match the tokens: img_ids {list(img_ids.shape)} for {img.shape[1]} image "
                f"tokens, txt_ids {list(txt_ids.shape)} for {n_txt} text tokens"
            )
        if tokens is not None:  # Kontext context tokens (after the targets) always stay
            keep = torch.cat((tokens, torch.arange(n_img, img.shape[1], device=tokens.device)))
            img, img_ids, n_img = img[:, keep], img_ids[keep], tokens.shape[0]
        pe = self.pe_embedder(torch.cat((txt_ids.to(img_ids.dtype), img_ids), dim=0))
        vec = self.conditioning(timesteps, y, guidance)
        return FluxState(self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype)), vec, pe, n_txt, n_img)

    def blocks(
        self, state: FluxState, start: int = 0, end: int | None = None, controls=None, single_controls=None
    ) -> FluxState:
        """Run blocks ``start`` .. ``end - 1`` (see :attr:`num_blocks`) on ``state``, in place.
        ``controls`` / ``single_controls``: ControlNet residuals [B, N, C] added to the image tokens
        after each double / single block, block i taking residual ``i // ceil(blocks / residuals)``
        (diffusers' FluxTransformer2DModel)."""
        depth = len(self.double_blocks)
        for i in range(start, self.num_blocks if end is None else end):
            if i < depth:
                state.img, state.txt = self.double_blocks[i](state.img, state.txt, state.vec, state.pe)
                if controls is not None:
                    state.img = state.img + controls[i // -(-depth // len(controls))]
            else:
                state.x = self.single_blocks[i - depth](state.joined(), state.vec, state.pe)
                if single_controls is not None:
                    j, a, b = i - depth, state.n_txt, state.n_txt + state.n_img
                    r = single_controls[j // -(-len(self.single_blocks) // len(single_controls))]
                    state.x = torch.cat((state.x[:, :a], state.x[:, a:b] + r, state.x[:, b:]), dim=1)
        return state

    def final(self, state: FluxState) -> torch.Tensor:
        """The velocity of the target image tokens [B, N, out] from the state after the last block."""
        x = state.joined()[:, state.n_txt : state.n_txt + state.n_img]
        return self.final_layer(x, state.vec)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        y: torch.Tensor,
        timesteps: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        img_cond: torch.Tensor | None = None,
        img_cond_ids: torch.Tensor | None = None,
        controls: list[torch.Tensor] | None = None,
        single_controls: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the velocity of the target image tokens.

        img [B, N, in] packed latents; txt [B, T, context_in] T5 states; y [B, vec_in] pooled CLIP;
        timesteps [B] sigma in [0, 1]; img_ids [N, 3] (or [B, N, 3], one grid for the batch);
        txt_ids [T, 3] (default zeros); guidance [B] (dev/Kontext); img_cond [B, M, in] with
        img_cond_ids [M, 3] (Kontext context image, ids with axis 0 = 1) is appended after the
        target tokens and sliced off the output; ``controls`` / ``single_controls``: ControlNet
        residuals (:meth:`blocks`). Same as ``final(blocks(embed(...)))``.
        """
        state = self.embed(img, txt, y, timesteps, img_ids, txt_ids, guidance, img_cond, img_cond_ids)
        return self.final(self.blocks(state, controls=controls, single_controls=single_controls))


def make_img_ids(h_tokens: int, w_tokens: int, index: int = 0, device=None) -> torch.Tensor:
    """Position ids (index, row, col) of a packed h x w token grid, row-major: [h*w, 3] fp32."""
    ids = torch.zeros(h_tokens, w_tokens, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h_tokens, device=device)[:, None]
    ids[..., 2] = torch.arange(w_tokens, device=device)[None, :]
    return ids.reshape(h_tokens * w_tokens, 3)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), C*4], feature index c*4 + ph*2 + pw (REFERENCE.md 3.1)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise InputError(f"latent height and width must be even, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`; h, w are the latent (not token) sizes."""
    b, n, f = x.shape
    c = f // 4
    x = x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)
