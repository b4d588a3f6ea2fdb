"""A FLUX double-block attention written the way the BFL reference (flux/math.py, flux/modules)
writes it, for the backend's pattern tests: fused qkv split with einops, QKNorm (fp32 RMS, cast
back, then the scale; cast to v's dtype), joint cat, RoPE as 2x2 rotation matrices per pair."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """[B, L] positions -> [B, L, dim/2, 2, 2] rotation matrices."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = torch.einsum("...n,d->...nd", pos.double(), omega)
    out = torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def embed_nd(ids: torch.Tensor, axes_dim=(4, 6, 6), theta=10000) -> torch.Tensor:
    """ids [B, L, 3] -> pe [B, 1, L, D/2, 2, 2]."""
    return torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3).unsqueeze(1)


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.2 * torch.randn(dim))

    def forward(self, x):
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class DoubleAttention(nn.Module):
    """The attention part of a BFL DoubleStreamBlock (txt first), from both streams' inputs."""

    def __init__(self, heads=2, head_dim=16):
        super().__init__()
        width = heads * head_dim
        self.heads = heads
        self.img_qkv, self.txt_qkv = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)
        self.img_norm, self.txt_norm = QKNorm(head_dim), QKNorm(head_dim)

    def forward(self, img, txt, ids):
        pe = embed_nd(ids)
        iq, ik, iv = rearrange(self.img_qkv(img), "B L (K H D) -> K B H L D", K=3, H=self.heads)
        iq, ik = self.img_norm(iq, ik, iv)
        tq, tk, tv = rearrange(self.txt_qkv(txt), "B L (K H D) -> K B H L D", K=3, H=self.heads)
        tq, tk = self.txt_norm(tq, tk, tv)
        q, k, v = torch.cat((tq, iq), dim=2), torch.cat((tk, ik), dim=2), torch.cat((tv, iv), dim=2)
        q, k = apply_rope(q, k, pe)
        x = F.scaled_dot_product_attention(q, k, v)
        return rearrange(x, "B H L D -> B L (H D)")
