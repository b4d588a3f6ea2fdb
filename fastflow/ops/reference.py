"""Plain-torch references for every fastflow op: the oracle for kernels and the CPU path.

Convention: math in fp32, one cast back to the input (model) dtype at the end, which is what the
fused kernels do. Shapes: B batch, L tokens, C channels, H heads, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError


def layernorm_modulate_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """(1 + scale) * LN(x) + shift. x [B, L, C]; shift, scale [B, C]; LN without affine."""
    xf = x.float()  # [B, L, C]
    y = F.layer_norm(xf, (xf.shape[-1],), eps=eps)
    y = y * (1.0 + scale.float()[:, None, :]) + shift.float()[:, None, :]
    return y.to(x.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, returned in fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, D/2] cos / sin -> [L, D] tables for :func:`rotate`: cos per element, and sin signed so
    that pair (x[2j], x[2j+1]) becomes (x[2j] cos - x[2j+1] sin, x[2j+1] cos + x[2j] sin)."""
    return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def rotate(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + swap(x) * sin on :func:`rope_tables`, swap exchanging each pair: bit for bit the
    pairwise formula of :func:`rope_ref` (negation is exact and the sums have the same two terms)
    in four kernels instead of seven."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * cos_full + swapped * sin_signed


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) by the angle whose cos/sin are given, in fp32.

    x [B, H, L, D] (fp32); cos, sin [L, D/2] fp32.
    """
    return rotate(x, *rope_tables(cos, sin))


def _heads_view(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A projection [B, L, H*D] seen as [B, H, L, D]."""
    b, seq, width = x.shape
    return x.reshape(b, seq, num_heads, width // num_heads).transpose(1, 2)


def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K H D) layout: all of q, then k, then v; [B, L, 3HD] -> 3 x [B, L, HD] views."""
    return qkv.chunk(3, dim=-1)


def _stream_into(outs, q, k, v, q_scale, k_scale, tables, num_heads: int, eps: float) -> None:
    """One stream's q, k, v [B, L, H*D] normed / rotated in fp32 and written (one rounding to the
    output dtype) into ``outs``, three [B, H, L, D] tensors or slices."""
    for x, scale, rope, out in ((q, q_scale, True, outs[0]), (k, k_scale, True, outs[1]), (v, None, False, outs[2])):
        x = _heads_view(x, num_heads)
        if scale is None and (tables is None or not rope):
            out.copy_(x)
            continue
        y = x.float() if scale is None else rms_norm_ref(x, scale, eps)
        out.copy_(y if tables is None else rotate(y, *tables))


def _outputs(x: torch.Tensor, num_heads: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (x.shape[0], num_heads, tokens, x.shape[-1] // num_heads)
    return tuple(x.new_empty(shape) for _ in range(3))


def qkv_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_scale: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention inputs from q, k, v projections [B, L, H*D]: per-head RMSNorm (learnable scale) of
    q and k where their scales are given, then FLUX interleaved-pair RoPE where the tables (cos,
    sin [L, D/2] fp32) are given, all in fp32 with one rounding to the input dtype at the end.

    Returns q, k, v [B, H, L, D], new contiguous tensors (op outputs may not alias the inputs).
    """
    outs = _outputs(q, num_heads, q.shape[1])
    tables = None if cos is None else rope_tables(cos, sin)
    _stream_into(outs, q, k, v, q_scale, k_scale, tables, num_heads, eps)
    return outs


def qk_norm_rope_ref(
    qkv: torch.Tensor,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (learnable scale) on q and k, then FLUX interleaved-pair RoPE in fp32.

    qkv [B, L, 3*H*D] -> q, k, v each [B, H, L, D] contiguous, in qkv's dtype.
    """
    return qkv_norm_rope_ref(*_split_qkv(qkv), q_scale, k_scale, cos, sin, num_heads, eps)


def qk_norm_ref(
    qkv: torch.Tensor,
    q_scale: torch.Tensor | None,
    k_scale: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split fused qkv [B, L, 3*H*D] into q, k, v [B, H, L, D]; RMSNorm q and k (SD3.5 ln_q/ln_k)
    where their scales are given, in fp32. Without scales (SD3-medium) q and k are only split."""
    return qkv_norm_rope_ref(*_split_qkv(qkv), q_scale, k_scale, None, None, num_heads, eps)


def joint_qkv_norm_rope_ref(
    q_a: torch.Tensor,
    k_a: torch.Tensor,
    v_a: torch.Tensor,
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    v_b: torch.Tensor,
    a_q_scale: torch.Tensor | None,
    a_k_scale: torch.Tensor | None,
    b_q_scale: torch.Tensor | None,
    b_k_scale: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint attention's q, k, v [B, H, La + Lb, D] from two streams' projections ([B, La, H*D] and
    [B, Lb, H*D], e.g. FLUX's txt and img, SD3's context and x), each with its own q / k norm
    scales: :func:`qkv_norm_rope_ref` per stream (RoPE tables [La + Lb, D/2] in [a | b] order),
    joined along the tokens."""
    la, lb = q_a.shape[1], q_b.shape[1]
    outs = _outputs(q_a, num_heads, la + lb)
    tables = None if cos is None else rope_tables(cos, sin)
    for rows, (q, k, v, q_scale, k_scale) in (
        (slice(0, la), (q_a, k_a, v_a, a_q_scale, a_k_scale)),
        (slice(la, la + lb), (q_b, k_b, v_b, b_q_scale, b_k_scale)),
    ):
        part = None if tables is None else tuple(t[rows] for t in tables)
        _stream_into([o[:, :, rows] for o in outs], q, k, v, q_scale, k_scale, part, num_heads, eps)
    return outs


def joint_qk_norm_rope_ref(
    qkv_a: torch.Tensor,
    qkv_b: torch.Tensor,
    a_q_scale: torch.Tensor | None,
    a_k_scale: torch.Tensor | None,
    b_q_scale: torch.Tensor | None,
    b_k_scale: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`joint_qkv_norm_rope_ref` on two streams' fused qkv ([B, La, 3*H*D], [B, Lb, 3*H*D])."""
    return joint_qkv_norm_rope_ref(
        *_split_qkv(qkv_a), *_split_qkv(qkv_b), a_q_scale, a_k_scale, b_q_scale, b_k_scale, cos, sin, num_heads, eps
    )


def gated_residual_ref(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y [B, L, C]; gate [B, C] broadcast over tokens."""
    return (x.float() + gate.float()[:, None, :] * y.float()).to(x.dtype)


def gated_residual_layernorm_modulate_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-boundary pair: r = x + gate * y, then h = (1 + scale) * LN(r) + shift.

    Returns (r, h), both in x.dtype; h is computed from r as stored (rounded to x.dtype), exactly as
    the two separate ops would.
    """
    r = gated_residual_ref(x, gate, y)
    return r, layernorm_modulate_ref(r, shift, scale, eps)


def _cpu_reduced(x: torch.Tensor) -> bool:
    """torch's CPU kernels for bf16 / fp16 elementwise ops compute in fp32 and round once, as the
    references do: there the fp32 copies would only cost (2x for GELU at FLUX width, bit-identical)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def gelu_tanh_ref(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, computed in fp32 (on a CPU, torch's own bf16 / fp16 kernel
    does exactly that, without the copies)."""
    if _cpu_reduced(x):
        return F.gelu(x, approximate="tanh")
    return F.gelu(x.float(), approximate="tanh").to(x.dtype)


def bias_gelu_tanh_ref(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU_tanh(x + bias) in fp32, for a GEMM output x [..., N] computed without its bias [N]."""
    return F.gelu(x.float() + bias.float(), approximate="tanh").to(x.dtype)


def geglu_ref(x: torch.Tensor) -> torch.Tensor:
    """GEGLU's gate: h * GELU(g) for x [..., 2I] = [h | g], exact (erf) GELU, in fp32, one rounding
    to x.dtype (diffusers' and sgm's ``h * F.gelu(g)`` rounds twice in bf16 / fp16)."""
    if x.shape[-1] % 2:
        raise InputError(f"geglu needs an even last dimension ([value | gate]), got {list(x.shape)}")
    h, g = x.float().chunk(2, dim=-1)
    return (h * F.gelu(g)).to(x.dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on [B, H, L, D]; scale defaults to 1/sqrt(D). No mask, no dropout.
    Returned in the layout of every implementation: see :func:`attention_layout`."""
    return attention_layout(F.scaled_dot_product_attention(q, k, v, scale=scale))


def attention_layout(out: torch.Tensor) -> torch.Tensor:
    """An attention output [B, H, L, D] as every implementation of ``fastflow::attention`` returns
    it: [B, L, H, D] in memory (the kernel writes it so, and merging heads is a view), seen as
    [B, H, L, D]. Copies only when ``out`` is laid out otherwise."""
    if out.transpose(1, 2).is_contiguous():
        return out
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def attention_lse_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, max_chunk_bytes: int = 1 << 26
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v with the log-sum-exp of each query's scores, in fp32 math.

    q [B, H, M, D], k [B, H, N, D], v [B, H, N, Dv]; scale defaults to 1/sqrt(D). Returns (out
    [B, H, M, Dv] in q's dtype and the layout of :func:`attention_layout`, lse [B, H, M] fp32,
    natural log: lse = log sum_j exp(scale * q.k_j)). Queries go in chunks whose fp32 scores take
    at most about ``max_chunk_bytes``, so memory stays bounded at long sequences."""
    b, h, m, _ = q.shape
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kt, vf = k.float().transpose(-1, -2), v.float()
    rows = max(1, max_chunk_bytes // (4 * b * h * max(1, k.shape[2])))
    out = q.new_empty((b, m, h, v.shape[-1])).transpose(1, 2)
    lse = q.new_empty((b, h, m), dtype=torch.float32)
    for start in range(0, m, rows):
        scores = torch.matmul(q[:, :, start : start + rows].float(), kt) * scale
        part = torch.logsumexp(scores, dim=-1)
        lse[:, :, start : start + rows] = part
        out[:, :, start : start + rows] = torch.matmul(torch.exp(scores - part[..., None]), vf)
    return out, lse


def groupnorm_silu_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int = 32, eps: float = 1e-6
) -> torch.Tensor:
    """SiLU(GroupNorm(x)) with affine weight/bias [C], fp32 statistics. x [B, C, *spatial], any
    memory format (NCHW or channels-last); returns x.dtype in x's memory format.

    Normalised in NCHW order: torch's CPU group_norm on channels-last fp32 loses precision when the
    mean is large next to the spread (1.4e-2 error at mean 100, std 1, against 1.4e-5 contiguous)."""
    fmt = (
        torch.channels_last
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    y = F.silu(F.group_norm(x.float().contiguous(), num_groups, weight.float(), bias.float(), eps))
    return y.to(x.dtype).contiguous(memory_format=fmt)


# FP8 (W8A8, e4m3). Activations are quantized with amax scaling: scale = amax / 448 (per token row
# or per tensor), q = clamp(x * (448 / amax), +-448) rounded to nearest even; weights likewise per
# output channel or per tensor. Products of two e4m3 values are exact in fp32.
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
FP8_MIN_AMAX = 1e-12  # an all-zero row quantizes to zeros with a tiny, finite scale


def fp8_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(448 / amax, amax / 448) with IEEE division, as the kernels compute them (div_rn). Written as
    tensor / tensor: torch evaluates ``scalar / tensor`` as a reciprocal times the scalar, which is
    not correctly rounded and would move values that sit next to an FP8 rounding midpoint."""
    full = torch.full_like(amax, FP8_MAX)
    return torch.div(full, amax), torch.div(amax, full)


def fp8_quantize_ref(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale fp32 [M] or [1]) with x ~= q * scale.

    static_scale (fp32, one element) is used as given; otherwise the scale is amax / 448 of each row
    (per_token) or of the whole tensor."""
    xf = x.float()  # [M, K]
    if static_scale is not None:
        scale = static_scale.float().reshape(1).clone()  # an output never aliases an input
        inv = torch.div(torch.ones_like(scale), scale)  # [1], IEEE (see fp8_scales)
        q = (xf * inv).clamp(-FP8_MAX, FP8_MAX)
        return q.to(FP8_DTYPE), scale
    if per_token:
        amax = xf.abs().amax(dim=-1).clamp(min=FP8_MIN_AMAX)  # [M]
    else:
        amax = xf.abs().amax().clamp(min=FP8_MIN_AMAX).reshape(1)  # [1]
    inv, scale = fp8_scales(amax)
    q = (xf * (inv[:, None] if per_token else inv)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def fp8_scaled_mm_ref(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """epilogue((xq * x_scale) @ (w * w_scale)^T + bias), dequantized and computed in fp32.

    xq [M, K] fp8; x_scale fp32 [M] or [1]; w [N, K] fp8; w_scale fp32 [N] or [1]; bias [N] or None;
    gelu applies GELU (tanh) last. Returns [M, N] in out_dtype."""
    a = xq.float() * x_scale.float().reshape(-1, 1)  # [M, K]
    b = w.float() * w_scale.float().reshape(-1, 1)  # [N, K]
    y = a @ b.t()  # [M, N]
    if bias is not None:
        y = y + bias.float()
    if gelu:
        y = F.gelu(y, approximate="tanh")
    return y.to(out_dtype)


def fp8_linear_ref(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    static_scale: torch.Tensor | None = None,
    per_token: bool = True,
    gelu: bool = False,
) -> torch.Tensor:
    """An FP8 linear layer: quantize x [..., K] (see fp8_quantize_ref), then fp8_scaled_mm_ref with
    w [N, K] e4m3. Returns [..., N] in x's dtype."""
    lead = x.shape[:-1]
    xq, x_scale = fp8_quantize_ref(x.reshape(-1, x.shape[-1]), static_scale, per_token)  # [M, K]
    y = fp8_scaled_mm_ref(xq, x_scale, w, w_scale, bias, gelu, x.dtype)  # [M, N]
    return y.reshape(*lead, w.shape[0])


def layernorm_modulate_fp8_ref(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """layernorm_modulate_ref (rounded to x's dtype, as the unfused path stores it), then per-token
    quantization: (q [B*L, C] e4m3, scale fp32 [B*L])."""
    y = layernorm_modulate_ref(x, shift, scale, eps)  # [B, L, C]
    return fp8_quantize_ref(y.reshape(-1, y.shape[-1]), None, True)


def gated_residual_layernorm_modulate_fp8_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    y: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gated_residual_layernorm_modulate_ref, with h quantized per token as it is stored:
    (r [B, L, C] in x.dtype, q [B*L, C] e4m3, scale fp32 [B*L])."""
    r, h = gated_residual_layernorm_modulate_ref(x, gate, y, shift, scale, eps)
    q, q_scale = fp8_quantize_ref(h.reshape(-1, h.shape[-1]), None, True)
    return r, q, q_scale


def attention_gelu_concat_ref(attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """The single block's linear2 input: [merge_heads(attn) | GELU_tanh(mlp)].

    attn [B, H, L, D] (the attention output), mlp [B, L, M] (linear1's MLP columns, any row stride)
    -> [B, L, H*D + M] contiguous, in attn's dtype."""
    b, h, seq, d = attn.shape
    merged = attn.transpose(1, 2).reshape(b, seq, h * d)  # [B, L, H*D]
    return torch.cat((merged, gelu_tanh_ref(mlp).to(attn.dtype)), dim=-1)
