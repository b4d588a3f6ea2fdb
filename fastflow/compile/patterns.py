"""FX rewrites of the slow patterns diffusers' (and hand-written) transformers spell out, into
fastflow's fused ops, on the graphs dynamo captures (torch-level: ``F.layer_norm``,
``operator.mul``, ``Tensor.unsqueeze``, ...).

Each pass matches one pattern exactly (shapes, dtypes and constants read off the nodes' example
values) and replaces it with one ``torch.ops.fastflow.*`` call; anything that does not match
exactly is left alone. Passes return how many sites they rewrote.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

fastflow = torch.ops.fastflow


def _val(node):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_method(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name


def _single_user(node) -> bool:
    return len(node.users) == 1


def _is_one(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 1


def _vector(node, x_val) -> fx.Node | None:
    """The [B, C] (or [1, C]) tensor that ``node`` broadcasts over x's tokens ([B, L, C]):
    ``v[:, None]``, ``v[:, None, :]`` or ``v.unsqueeze(1)``."""
    if _is_call(node, operator.getitem):
        src, index = node.args
        if index not in ((slice(None), None), (slice(None), None, slice(None))):
            return None
    elif _is_method(node, "unsqueeze") and node.args[1:] == (1,) and not node.kwargs:
        src = node.args[0]
    else:
        return None
    v = _val(src)
    if not isinstance(v, torch.Tensor) or v.dim() != 2 or x_val is None:
        return None
    b, c = v.shape
    if c != x_val.shape[-1] or b not in (1, x_val.shape[0]) or v.dtype != x_val.dtype or x_val.dim() != 3:
        return None
    return src


def _operands(node, target):
    """(a, b) of a commutative ``a <target> b`` node, both orders tried by the callers."""
    if _is_call(node, target) and len(node.args) == 2 and not node.kwargs:
        return node.args
    return None


def _one_plus(node, x_val) -> fx.Node | None:
    """scale from ``1 + scale[:, None]``, ``scale[:, None] + 1`` or ``(1 + scale)[:, None]``."""
    ops = _operands(node, operator.add)
    if ops is not None:
        a, b = ops
        if _is_one(a):
            return _vector(b, x_val)
        if _is_one(b):
            return _vector(a, x_val)
        return None
    inner = _vector(node, x_val)  # (1 + scale)[:, None]: broadcast of an add
    ops = _operands(inner, operator.add) if inner is not None else None
    if ops is None:
        return None
    a, b = ops
    scale = b if _is_one(a) else a if _is_one(b) else None
    v = _val(scale)
    return scale if isinstance(v, torch.Tensor) and v.dim() == 2 else None


def _plain_layer_norm(node) -> tuple[fx.Node, float] | None:
    """(x, eps) of ``F.layer_norm(x, (C,), None, None, eps)`` over the last dim of a 3-D x."""
    if not _is_call(node, F.layer_norm):
        return None
    args = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args, strict=False))
    args.update(node.kwargs)
    x, eps = args["input"], args.get("eps", 1e-5)
    xv = _val(x)
    if xv is None or xv.dim() != 3 or args.get("weight") is not None or args.get("bias") is not None:
        return None
    if tuple(args["normalized_shape"]) != (xv.shape[-1],) or not isinstance(eps, float):
        return None
    return x, eps


def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple) -> fx.Node:
    """A call of ``target(*args)`` in place of ``node`` (its users now read the new node)."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    return new


def _rewrite_sum_of_product(gm: fx.GraphModule, target, match) -> int:
    """Every ``a + p * q`` (both operand orders of the sum and of the single-use product) for which
    ``match(a, p, q)`` returns the arguments of ``target`` becomes one call of it."""
    count = 0
    for node in list(gm.graph.nodes):
        ops = _operands(node, operator.add)
        if ops is None:
            continue
        args = None
        for a, prod in (ops, ops[::-1]):
            mul = _operands(prod, operator.mul)
            if mul is not None and _single_user(prod):
                args = next((m for p, q in (mul, mul[::-1]) if (m := match(a, p, q)) is not None), None)
            if args is not None:
                break
        if args is not None:
            _replace(gm, node, target, args)
            count += 1
    return count


def _match_modulate(shift_b, ln, factor):
    found = _plain_layer_norm(ln)  # may feed several modulations (SD3.5's MMDiT-X norm1): each is fused
    if found is None:
        return None
    x, eps = found
    xv = _val(x)
    scale, shift = _one_plus(factor, xv), _vector(shift_b, xv)
    if scale is None or shift is None or _val(scale).shape != _val(shift).shape:
        return None
    return x, shift, scale, eps


def _match_gated(x, g, y):
    xv, yv = _val(x), _val(y)
    if not isinstance(xv, torch.Tensor) or xv.dim() != 3 or not isinstance(yv, torch.Tensor):
        return None
    gate = _vector(g, xv)
    if gate is None or yv.shape != xv.shape or yv.dtype != xv.dtype:
        return None
    return x, gate, y


def layernorm_modulate(gm: fx.GraphModule) -> int:
    """LN(x) * (1 + scale) + shift (no affine LN; scale, shift [B, C] broadcast) => layernorm_modulate."""
    return _rewrite_sum_of_product(gm, fastflow.layernorm_modulate.default, _match_modulate)


def gated_residual(gm: fx.GraphModule) -> int:
    """x + gate[:, None] * y (x, y [B, L, C] of one dtype, gate [B, C]) => gated_residual."""
    return _rewrite_sum_of_product(gm, fastflow.gated_residual.default, _match_gated)


def gated_residual_layernorm_modulate(gm: fx.GraphModule) -> int:
    """gated_residual whose result feeds a layernorm_modulate => one op returning (r, h). The op
    goes where the layernorm was, or, where r has users before the layernorm (a ControlNet's
    projection of a block's output comes before the next block's modulation), right after its last
    input; where a user of r comes before that too, the two stay separate."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_call(node, fastflow.layernorm_modulate.default):
            continue
        r, shift, scale, eps = node.args
        if not _is_call(r, fastflow.gated_residual.default):
            continue
        x, gate, y = r.args
        place = _boundary_place(gm, node, r, (x, gate, y, shift, scale, eps))
        if place is None:
            continue
        with gm.graph.inserting_before(place):
            fused = gm.graph.call_function(
                fastflow.gated_residual_layernorm_modulate.default, (x, gate, y, shift, scale, eps)
            )
            new_r = gm.graph.call_function(operator.getitem, (fused, 0))
            new_h = gm.graph.call_function(operator.getitem, (fused, 1))
        new_r.meta, new_h.meta = dict(r.meta), dict(node.meta)
        node.replace_all_uses_with(new_h)
        r.replace_all_uses_with(new_r)
        count += 1
    return count


def _boundary_place(gm: fx.GraphModule, node: fx.Node, r: fx.Node, inputs) -> fx.Node | None:
    """The node to insert the combined op before: ``node`` (the layernorm) when every other user of
    ``r`` comes after it, else the node after the last of ``inputs`` when every user of ``r`` comes
    after that one; None when no place is before all of ``r``'s users and after all its inputs."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    early = [u for u in r.users if u is not node and order[u] < order[node]]
    if not early:
        return node
    last = max((a for a in inputs if isinstance(a, fx.Node)), key=order.__getitem__)
    if any(order[u] <= order[last] for u in early):
        return None
    return last.next


def bias_gelu_tanh(gm: fx.GraphModule) -> int:
    """GELU(tanh)(F.linear(x, w, b)) => bias_gelu_tanh(F.linear(x, w), b): the bias add joins the
    activation pass (on CUDA the op may also run inside the GEMM's epilogue)."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_call(node, torch._C._nn.gelu, F.gelu) or node.kwargs.get("approximate") != "tanh":
            continue
        lin = node.args[0]
        if not _is_call(lin, F.linear, torch._C._nn.linear) or not _single_user(lin):
            continue
        args = dict(zip(("input", "weight", "bias"), lin.args, strict=False))
        args.update(lin.kwargs)
        bias = args.get("bias")
        if bias is None:
            continue
        with gm.graph.inserting_before(node):
            mm = gm.graph.call_function(F.linear, (args["input"], args["weight"]))
        mm.meta = dict(lin.meta)
        _replace(gm, node, fastflow.bias_gelu_tanh.default, (mm, bias))
        count += 1
    return count


def groupnorm_silu(gm: fx.GraphModule) -> int:
    """SiLU(F.group_norm(x, G, w, b, eps)) (affine) => groupnorm_silu."""
    count = 0
    for node in list(gm.graph.nodes):
        if not _is_call(node, F.silu) or node.kwargs.get("inplace", False):
            continue
        gn = node.args[0]
        if not _is_call(gn, F.group_norm) or not _single_user(gn):
            continue
        args = dict(zip(("input", "num_groups", "weight", "bias", "eps"), gn.args, strict=False))
        args.update(gn.kwargs)
        if args.get("weight") is None or args.get("bias") is None:
            continue
        gn_args = (args["input"], args["weight"], args["bias"], args["num_groups"], args.get("eps", 1e-5))
        _replace(gm, node, fastflow.groupnorm_silu.default, gn_args)
        count += 1
    return count
