"""FX rewrite of the attention inputs transformers build, as diffusers writes them (q, k and v
projections split into heads; RMSNorm on q and k per head as ``torch.rms_norm`` or the spelled-out
fp32 variance form; the streams of joint attention joined with ``torch.cat``; FLUX's real-valued
RoPE of ``apply_rotary_emb`` on repeat-interleaved tables) and as the BFL reference writes them
(one fused qkv projection split with einops; QKNorm; ``apply_rope`` with 2x2 rotation matrices
per pair, built as ``stack([cos, -sin, sin, cos])``). All of it, from the projections to the
[B, H, L, D] tensors handed to ``scaled_dot_product_attention``, becomes one call of
``fastflow::qkv_norm_rope`` (one stream: FLUX single blocks) or ``fastflow::joint_qkv_norm_rope``
(FLUX double blocks, SD3 / SD3.5 joint blocks).

The match starts at each ``scaled_dot_product_attention`` and reads its q, k, v backwards; a site
is rewritten only when every piece is exactly the expected expression (shapes and dtypes from the
nodes' example values), q and k of every stream are normalised with one eps, and q and k share
one RoPE table (or have none). The fused op computes norm and rotation in fp32 and rounds once,
where diffusers rounds to the model dtype after the norm too: identical in fp32, within one bf16
rounding in bf16.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from .patterns import _is_call, _is_method, _val

fastflow = torch.ops.fastflow
_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_RMS_NORM = tuple(f for f in (getattr(torch, "rms_norm", None), getattr(F, "rms_norm", None)) if f is not None)

BLHD, BHLD = "blhd", "bhld"  # layouts of a head-split projection
_TOKEN_DIM = {BLHD: 1, BHLD: 2}


@dataclass
class _Stream:
    proj: fx.Node | tuple[fx.Node, int]  # [B, L, H*D] projection, or (fused qkv [B, L, 3*H*D], part)
    weight: fx.Node | None  # RMSNorm scale [D]
    eps: float | None


@dataclass
class _Parsed:
    streams: list[_Stream]
    rope: tuple | None  # ("interleaved", cos [L, D], sin [L, D]) or ("matrices", pe [1, 1, L, D/2, 2, 2])
    heads: int


def _tensor(node) -> torch.Tensor | None:
    v = _val(node)
    return v if isinstance(v, torch.Tensor) else None


def _proj_shape_dtype(proj) -> tuple[tuple, torch.dtype]:
    if isinstance(proj, tuple):
        v = _tensor(proj[0])
        return (*v.shape[:-1], v.shape[-1] // 3), v.dtype
    v = _tensor(proj)
    return tuple(v.shape), v.dtype


def _fused_qkv_part(node) -> tuple[fx.Node, int] | None:
    """(qkv, i) of ``qkv.reshape(B, L, 3, H, D).permute(2, 0, 3, 1, 4)[i]`` (einops'
    ``rearrange(qkv, "B L (K H D) -> K B H L D", K=3)`` as dynamo traces it): part i as [B, H, L, D]."""
    if not _is_call(node, operator.getitem) or node.args[1] not in (0, 1, 2):
        return None
    perm = node.args[0]
    if not _is_method(perm, "permute") or _dims(perm.args[1:]) != (2, 0, 3, 1, 4):
        return None
    reshape = perm.args[0]
    if not any(_is_method(reshape, m) for m in ("reshape", "view")):
        return None
    qkv, rv = reshape.args[0], _tensor(reshape)
    qv = _tensor(qkv)
    if qv is None or rv is None or qv.dim() != 3 or rv.dim() != 5 or rv.shape[2] != 3:
        return None
    if tuple(rv.shape[:2]) != tuple(qv.shape[:2]) or 3 * rv.shape[3] * rv.shape[4] != qv.shape[2]:
        return None
    return qkv, node.args[1]


def _dims(args) -> tuple:
    """permute's dims, given as varargs or as one list."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else tuple(args)


def _heads_split(node) -> tuple[fx.Node | tuple[fx.Node, int], str] | None:
    """(projection [B, L, H*D], layout) of ``proj.unflatten(-1, (H, D))`` / ``.view(B, -1, H, D)`` /
    ``.reshape(...)`` ([B, L, H, D]: BLHD), or of that ``.transpose(1, 2)`` (BHLD); or a part of
    a fused qkv projection (BHLD)."""
    part = _fused_qkv_part(node)
    if part is not None:
        return part, BHLD
    if _is_method(node, "transpose") and tuple(node.args[1:]) in ((1, 2), (2, 1)):
        inner = _heads_split(node.args[0])
        return (inner[0], BHLD) if inner is not None and inner[1] == BLHD else None
    if not any(_is_method(node, m) for m in ("unflatten", "view", "reshape")):
        return None
    src = node.args[0]
    sv, nv = _tensor(src), _tensor(node)
    if sv is None or nv is None or sv.dim() != 3 or nv.dim() != 4:
        return None
    if tuple(nv.shape[:2]) != tuple(sv.shape[:2]) or nv.shape[2] * nv.shape[3] != sv.shape[2]:
        return None
    if _is_method(node, "unflatten") and node.args[1] not in (-1, 2):
        return None
    return src, BLHD


def _is_weight(node, head_dim: int, dtype) -> bool:
    w = _tensor(node)
    return w is not None and tuple(w.shape) == (head_dim,) and w.dtype == dtype


def _rms_norm(node) -> tuple[fx.Node, fx.Node, float] | None:
    """(x, weight, eps) of a per-head RMSNorm with a scale whose output keeps x's dtype:
    ``torch.rms_norm(x, (D,), w, eps)``, or the spelled-out forms of diffusers
    ``(x * rsqrt(x.to(float32).pow(2).mean(-1, keepdim=True) + eps))[.to(w.dtype)] * w`` and of BFL
    ``(xf * rsqrt(torch.mean(xf ** 2, dim=-1, keepdim=True) + eps)).to(x.dtype) * scale``, xf = x.float()."""
    out = _tensor(node)
    if out is None or out.dim() != 4:
        return None
    head_dim = out.shape[-1]
    if _is_call(node, *_RMS_NORM):
        args = dict(zip(("input", "normalized_shape", "weight", "eps"), node.args, strict=False))
        args.update(node.kwargs)
        x, w, eps = args["input"], args.get("weight"), args.get("eps")
        xv = _tensor(x)
        if xv is None or tuple(args["normalized_shape"]) != (head_dim,) or not isinstance(eps, float):
            return None
        return (x, w, eps) if _is_weight(w, head_dim, xv.dtype) and out.dtype == xv.dtype else None
    if not _is_call(node, operator.mul) or len(node.args) != 2:
        return None
    for normed, w in (node.args, node.args[::-1]):
        if _is_method(normed, "to") and _tensor(normed.args[0]) is not None:
            normed = normed.args[0]  # the cast to a 16-bit weight's dtype, or back to x's
        found = _spelled_out_rms(normed)
        if found is None:
            continue
        x, eps = found
        xv = _tensor(x)
        if _is_weight(w, head_dim, xv.dtype) and out.dtype == xv.dtype:
            return x, w, eps
    return None


def _upcast_of(node) -> fx.Node | None:
    """x of ``x.to(torch.float32)`` / ``x.float()``."""
    if _is_method(node, "float") and len(node.args) == 1:
        return node.args[0]
    if _is_method(node, "to") and (node.args[1:] == (torch.float32,) or node.kwargs == {"dtype": torch.float32}):
        return node.args[0]
    return None


def _mean_of_square(node) -> fx.Node | None:
    """u of ``u.pow(2).mean(-1, keepdim=True)`` / ``torch.mean(u ** 2, dim=-1, keepdim=True)``."""
    if not (_is_method(node, "mean") or _is_call(node, torch.mean)):
        return None
    dims = (*node.args[1:], node.kwargs.get("dim"))
    if -1 not in dims or node.kwargs.get("keepdim") is not True or len(node.args) > 2:
        return None
    sq = node.args[0]
    if _is_method(sq, "pow") and sq.args[1:] == (2,):
        return sq.args[0]
    if _is_call(sq, operator.pow) and sq.args[1] == 2:
        return sq.args[0]
    return None


def _spelled_out_rms(node) -> tuple[fx.Node, float] | None:
    """(x, eps) of ``m * torch.rsqrt(mean(u ** 2, -1, keepdim=True) + eps)`` where u = x in fp32 and
    m is x or u."""
    if not _is_call(node, operator.mul) or len(node.args) != 2:
        return None
    for m, r in (node.args, node.args[::-1]):
        if not _is_call(r, torch.rsqrt):
            continue
        add = r.args[0]
        if not _is_call(add, operator.add) or not isinstance(add.args[1], float):
            continue
        up = _mean_of_square(add.args[0])
        x = _upcast_of(up) if up is not None else None
        if x is not None and (m is x or m is up):
            return x, add.args[1]
    return None


def _table(node, layout: str) -> fx.Node | None:
    """The [L, D] table of ``table[None, :, None, :]`` (BLHD) or ``table[None, None]`` (BHLD), through
    ``.to(device)``, when it is a repeat-interleaved one (each angle twice, so pairs share it)."""
    if _is_method(node, "to"):
        node = node.args[0]
    index = {BLHD: (None, slice(None), None, slice(None)), BHLD: (None, None)}[layout]
    if not _is_call(node, operator.getitem) or node.args[1] != index:
        return None
    table = node.args[0]
    return table if _repeat_interleaved(table) else None


def _repeat_interleaved(node) -> bool:
    """``torch.cat([part.float(), ...], dim=-1)`` (through ``.to(device)``) of parts each
    ``x.repeat_interleave(2, dim=1)``: diffusers' FluxPosEmbed tables."""
    if _is_method(node, "to"):
        node = node.args[0]
    if _is_call(node, torch.cat):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return dim in (-1, 1) and all(_repeat_interleaved(p) for p in node.args[0])
    if _is_method(node, "float"):
        node = node.args[0]
    if not _is_method(node, "repeat_interleave"):
        return False
    repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    return repeats == 2 and dim == 1


def _rope(node, layout: str) -> tuple[fx.Node, tuple] | None:
    """(x, ("interleaved", cos, sin)) of diffusers' ``apply_rotary_emb(x, (cos, sin), use_real=True)``:
    ``(x.float() * cos + stack([-x_imag, x_real], -1).flatten(3).float() * sin).to(x.dtype)``, or
    BFL's form (:func:`_rope_matrices`)."""
    found = _rope_matrices(node, layout)
    if found is not None:
        return found
    if not _is_method(node, "to"):
        return None
    add = node.args[0]
    if not _is_call(add, operator.add) or len(add.args) != 2:
        return None
    for straight, rotated in (add.args, add.args[::-1]):
        a, b = _float_times(straight), _float_times(rotated)
        if a is None or b is None:
            continue
        x, cos_b = a
        x_rot, sin_b = b
        if _rotated_of(x_rot) is not x:
            continue
        xv, out = _tensor(x), _tensor(node)
        cos, sin = _table(cos_b, layout), _table(sin_b, layout)
        if xv is None or out is None or out.dtype != xv.dtype or cos is None or sin is None:
            return None
        return x, ("interleaved", cos, sin)
    return None


def _rope_matrices(node, layout: str) -> tuple[fx.Node, tuple] | None:
    """(x, ("matrices", pe)) of BFL's ``apply_rope``: with ``x_ = x.float().reshape(..., -1, 1, 2)``,
    ``(pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(x.shape).type_as(x)``, when pe
    [1, 1, L, D/2, 2, 2] holds rotation matrices (see :func:`_rotation_matrices`)."""
    if layout != BHLD or not _is_method(node, "type_as"):
        return None
    x, reshape = node.args[1], node.args[0]
    if not _is_method(reshape, "reshape"):
        return None
    add = reshape.args[0]
    if not _is_call(add, operator.add) or len(add.args) != 2:
        return None
    pe, pairs = None, None
    for term, column in zip(add.args, (0, 1), strict=True):
        if not _is_call(term, operator.mul) or len(term.args) != 2:
            return None
        a, b = term.args
        for p, xs in ((a, b), (b, a)):
            if not (_is_call(p, operator.getitem) and _is_call(xs, operator.getitem)):
                continue
            if p.args[1] == (Ellipsis, column) and xs.args[1] == (Ellipsis, column):
                if pe not in (None, p.args[0]) or pairs not in (None, xs.args[0]):
                    return None
                pe, pairs = p.args[0], xs.args[0]
                break
        else:
            return None
    if not _is_method(pairs, "reshape") or _upcast_of(pairs.args[0]) is not x:
        return None
    xv, pv, pev, out = _tensor(x), _tensor(pairs), _tensor(pe), _tensor(node)
    if any(v is None for v in (xv, pv, pev, out)) or out.dtype != xv.dtype or xv.dim() != 4:
        return None
    b, h, seq, d = xv.shape
    if tuple(pv.shape) != (b, h, seq, d // 2, 1, 2) or tuple(pev.shape) != (1, 1, seq, d // 2, 2, 2):
        return None
    return (x, ("matrices", pe)) if _rotation_matrices(pe) else None


def _rotation_matrices(node) -> bool:
    """pe = ``torch.cat([m.float(), ...], dim=-3).unsqueeze(1)`` of parts each
    ``torch.stack([cos(a), -sin(a), sin(a), cos(a)], dim=-1)`` reshaped to [..., 2, 2]: BFL's EmbedND."""
    if not _is_method(node, "unsqueeze") or node.args[1:] != (1,):
        return False
    cat = node.args[0]
    if not _is_call(cat, torch.cat) or cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) != -3:
        return False
    for part in cat.args[0]:
        if _is_method(part, "float"):
            part = part.args[0]
        if not any(_is_method(part, m) for m in ("reshape", "view")):
            return False
        stack = part.args[0]
        if not _is_call(stack, torch.stack) or stack.kwargs.get("dim") != -1 or len(stack.args[0]) != 4:
            return False
        c1, neg, s1, c2 = stack.args[0]
        if not (_is_call(c1, torch.cos) and _is_call(c2, torch.cos) and _is_call(s1, torch.sin)):
            return False
        if not (_is_call(neg, operator.neg) and _is_call(neg.args[0], torch.sin)):
            return False
        if len({c1.args[0], c2.args[0], s1.args[0], neg.args[0].args[0]}) != 1:
            return False
    return True


def _float_times(node) -> tuple[fx.Node, fx.Node] | None:
    """(x, t) of ``x.float() * t``."""
    if not _is_call(node, operator.mul) or len(node.args) != 2:
        return None
    f, t = node.args
    return (f.args[0], t) if _is_method(f, "float") else None


def _rotated_of(node) -> fx.Node | None:
    """x of ``torch.stack([-x_imag, x_real], dim=-1).flatten(3)`` where
    ``x_real, x_imag = x.reshape(..., -1, 2).unbind(-1)``."""
    if not _is_method(node, "flatten") or node.args[1:] != (3,):
        return None
    stack = node.args[0]
    if not _is_call(stack, torch.stack) or stack.kwargs.get("dim", stack.args[1] if len(stack.args) > 1 else 0) != -1:
        return None
    parts = stack.args[0]
    if len(parts) != 2 or not _is_call(parts[0], operator.neg):
        return None
    imag, real = parts[0].args[0], parts[1]
    if not (_is_call(imag, operator.getitem) and _is_call(real, operator.getitem)):
        return None
    if imag.args[1] != 1 or real.args[1] != 0 or imag.args[0] is not real.args[0]:
        return None
    unbind = real.args[0]
    if not _is_method(unbind, "unbind") or unbind.args[1:] != (-1,):
        return None
    reshape = unbind.args[0]
    if not _is_method(reshape, "reshape"):
        return None
    x = reshape.args[0]
    rv, xv = _tensor(reshape), _tensor(x)
    if rv is None or xv is None or tuple(rv.shape) != (*xv.shape[:-1], xv.shape[-1] // 2, 2):
        return None
    return x


def _streams(node, layout: str) -> list[fx.Node]:
    """The parts of ``torch.cat([a, b], dim=<token dim>)``, else [node]."""
    if _is_call(node, torch.cat):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        parts = node.args[0]
        v = _tensor(node)
        if v is not None and dim in (_TOKEN_DIM[layout], _TOKEN_DIM[layout] - 4) and len(parts) == 2:
            return list(parts)
    return [node]


def _parse(node, normed: bool) -> tuple[str, _Parsed] | None:
    """Read an SDPA input back to its projections: (layout, parsed) or None."""
    layout = BHLD
    if (_is_method(node, "permute") and tuple(node.args[1:]) == (0, 2, 1, 3)) or (
        _is_method(node, "transpose") and tuple(node.args[1:]) in ((1, 2), (2, 1))
    ):
        node, layout = node.args[0], BLHD
    rope = None
    if normed:
        found = _rope(node, layout)
        if found is not None:
            node, rope = found
    streams, heads = [], None
    for part in _streams(node, layout):
        weight = eps = None
        if normed:
            if _is_method(part, "to") and isinstance(part.args[1], fx.Node):  # BFL: .to(v), same dtype
                inner, pv = part.args[0], _tensor(part)
                if _tensor(inner) is not None and pv is not None and pv.dtype == _tensor(inner).dtype:
                    part = inner
            found = _rms_norm(part)
            if found is None:
                return None
            part, weight, eps = found
        split = _heads_split(part)
        if split is None or split[1] != layout:
            return None
        heads = _tensor(part).shape[1 if layout == BHLD else 2]
        streams.append(_Stream(split[0], weight, eps))
    return layout, _Parsed(streams, rope, heads)


def _site(sdpa: fx.Node):
    """The parsed q, k, v of one ``scaled_dot_product_attention`` call when they form one rewritable
    site, else None."""
    args = dict(zip(("query", "key", "value"), sdpa.args, strict=False))
    args.update({k: v for k, v in sdpa.kwargs.items() if k in ("query", "key", "value")})
    if len(args) != 3:
        return None
    parsed = [_parse(args["query"], True), _parse(args["key"], True), _parse(args["value"], False)]
    if any(p is None for p in parsed):  # each read in its own layout: all end as [B, H, L, D]
        return None
    q, k, v = (p[1] for p in parsed)
    if not (len(q.streams) == len(k.streams) == len(v.streams)) or not (q.heads == k.heads == v.heads):
        return None
    if q.rope != k.rope:
        return None
    for sq, sk, sv in zip(q.streams, k.streams, v.streams, strict=True):
        first, *rest = (_proj_shape_dtype(s.proj) for s in (sq, sk, sv))
        if any(other != first for other in rest):  # compared, not hashed: shapes may be symbolic
            return None
    if len({s.eps for s in q.streams + k.streams}) != 1:
        return None
    return (args["query"], args["key"], args["value"]), q, k, v


def _tables(gm: fx.GraphModule, rope) -> tuple:
    """The op's (cos, sin) [L, D/2] from what the graph built (new nodes before the insertion point)."""
    if rope is None:
        return None, None
    if rope[0] == "interleaved":  # each angle twice: every other column
        every_other = (slice(None), slice(None, None, 2))
        return tuple(gm.graph.call_function(operator.getitem, (t, every_other)) for t in rope[1:])
    pe = rope[1]  # [1, 1, L, D/2, 2, 2] rotation matrices [[cos, -sin], [sin, cos]]
    return tuple(
        gm.graph.call_function(operator.getitem, (pe, (0, 0, slice(None), slice(None), row, 0))) for row in (0, 1)
    )


def _projection(gm: fx.GraphModule, proj):
    """A [B, L, H*D] projection node: the node itself, or a slice of a fused qkv."""
    if not isinstance(proj, tuple):
        return proj
    qkv, part = proj
    width = _tensor(qkv).shape[-1] // 3
    return gm.graph.call_function(operator.getitem, (qkv, (Ellipsis, slice(part * width, (part + 1) * width))))


def _rewrite(gm: fx.GraphModule, with_rope: bool) -> int:
    count = 0
    for sdpa in list(gm.graph.nodes):
        if not _is_call(sdpa, *_SDPA):
            continue
        site = _site(sdpa)
        if site is None or (site[1].rope is not None) != with_rope:
            continue
        inputs, q, k, v = site
        eps = q.streams[0].eps
        with gm.graph.inserting_before(sdpa):
            tables = _tables(gm, q.rope)
            projections = [
                _projection(gm, s.proj) for group in zip(q.streams, k.streams, v.streams, strict=True) for s in group
            ]
            weights = [s.weight for pair in zip(q.streams, k.streams, strict=True) for s in pair]
            op = fastflow.qkv_norm_rope.default if len(q.streams) == 1 else fastflow.joint_qkv_norm_rope.default
            fused = gm.graph.call_function(op, (*projections, *weights, *tables, q.heads, eps))
            outs = [gm.graph.call_function(operator.getitem, (fused, i)) for i in range(3)]
        for old, new in zip(inputs, outs, strict=True):
            new.meta = dict(old.meta)
            sdpa.replace_input_with(old, new)
        count += 1
    return count


def qk_norm_rope(gm: fx.GraphModule) -> int:
    """Projections -> heads -> RMSNorm(q, k) -> [cat] -> RoPE -> SDPA inputs (FLUX) => (joint_)qkv_norm_rope."""
    return _rewrite(gm, with_rope=True)


def qk_norm(gm: fx.GraphModule) -> int:
    """The same without RoPE (SD3.5's ln_q / ln_k) => (joint_)qkv_norm_rope without tables."""
    return _rewrite(gm, with_rope=False)
