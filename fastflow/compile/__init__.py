"""``torch.compile(model, backend="fastflow")``: rewrite the slow patterns of a transformer into
fastflow's fused ops, then hand the graph to inductor.

Registered under the name "fastflow" through the ``torch_dynamo_backends`` entry point, so the
backend works without importing fastflow first. On each captured graph:

1. pattern rewrites (:mod:`fastflow.compile.patterns`, :mod:`fastflow.compile.attention_patterns`):
   modulated LayerNorm, gated residual, the two at a sub-block boundary, the attention inputs
   (q / k / v projections -> heads -> RMSNorm -> [joint cat] -> RoPE), bias + GELU(tanh),
   GroupNorm + SiLU; :func:`report` counts them;
2. fastflow ops that have no kernel for the graph's device (CPU, or the reference backend) are
   replaced by their plain-torch reference bodies, so inductor sees inside them and fuses them;
   on CUDA they stay calls of the Triton kernels;
3. inductor, with ``emulate_precision_casts`` on (without it inductor drops the bf16 rounding of
   e.g. guidance x 1000: 3500 instead of 3504, 28% output error at guidance 3.5) and the caller's
   ``mode`` / ``options`` passed through.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
from torch import fx

from . import attention_patterns, patterns
from .accelerate import accelerate

__all__ = ["accelerate", "fastflow_backend", "report", "reset", "rewrite"]

# in order: the combined boundary pass needs both of its parts rewritten first
PASSES = {
    "layernorm_modulate": patterns.layernorm_modulate,
    "gated_residual": patterns.gated_residual,
    "gated_residual_layernorm_modulate": patterns.gated_residual_layernorm_modulate,
    "qk_norm_rope": attention_patterns.qk_norm_rope,
    "qk_norm": attention_patterns.qk_norm,
    "bias_gelu_tanh": patterns.bias_gelu_tanh,
    "groupnorm_silu": patterns.groupnorm_silu,
}

_log = logging.getLogger(__name__)
_COUNTS: Counter = Counter()


def report() -> dict[str, int]:
    """Sites rewritten since the last :func:`reset`, per pattern (every graph compiled with the
    backend counts, including recompiles)."""
    return {name: _COUNTS.get(name, 0) for name in PASSES}


def reset() -> None:
    _COUNTS.clear()


def _graph_device(example_inputs) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return torch.device("cpu")


def _decompose(gm: fx.GraphModule, device: torch.device) -> int:
    """Replace fastflow op calls that would run their reference on ``device`` by the reference
    functions themselves (traced by AOTAutograd into plain aten ops inductor can fuse)."""
    from fastflow.ops._registry import OPS, get_backend

    by_overload = {opdef.op._opoverload: opdef for opdef in OPS.values() if opdef.op is not None}
    count = 0
    for node in gm.graph.nodes:
        opdef = by_overload.get(node.target) if node.op == "call_function" else None
        if opdef is None:
            continue
        runs_kernel = get_backend() != "reference" and opdef.device_backend(device.type) is not None
        if not runs_kernel:
            node.target = opdef.reference
            count += 1
    return count


def rewrite(gm: fx.GraphModule, example_inputs, decompose: bool = True) -> dict[str, int]:
    """Run every pattern pass on ``gm`` in place, then (``decompose``) replace the ops without a
    kernel on the graph's device by their reference bodies. Returns this graph's counts."""
    counts = {}
    for name, fn in PASSES.items():
        counts[name] = fn(gm)
        gm.graph.eliminate_dead_code()
    decomposed = _decompose(gm, _graph_device(example_inputs)) if decompose else 0
    gm.graph.lint()
    gm.recompile()
    _COUNTS.update(counts)
    _log.info("fastflow backend: rewrote %s; %d op calls decomposed for inductor", counts, decomposed)
    return counts


@functools.cache
def _cache_key():
    """A post-grad pass that changes nothing: its ``uuid`` (a hash of fastflow's op, kernel and
    compile sources) enters inductor's FX graph cache key, so a fastflow upgrade (say, an op's fake
    returning another layout) never reuses a graph compiled against the old one. A caller's own
    ``post_grad_custom_post_pass`` in ``options`` takes its place."""
    from pathlib import Path

    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    root = Path(__file__).resolve().parent.parent
    files = tuple(sorted(str(p) for sub in ("ops", "kernels", "compile") for p in (root / sub).glob("*.py")))
    key = get_hash_for_files(files)

    class FastflowSources(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self):
            return key

    return FastflowSources()


def fastflow_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """The dynamo backend: fastflow's rewrites, then inductor (``mode`` and ``options`` as for
    ``torch.compile``'s default backend)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    rewrite(gm, example_inputs)
    patches = {"emulate_precision_casts": True, "post_grad_custom_post_pass": _cache_key()}
    if mode:
        patches.update(list_mode_options(mode))
    patches.update(options or {})
    return compile_fx(gm, example_inputs, config_patches=patches)
