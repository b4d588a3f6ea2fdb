"""Non-GEMM bytes per FLUX.1-dev step (bf16), diffusers' FluxTransformer2DModel eager vs the same
graph after the "fastflow" backend's rewrites, at three resolutions. NO TIME IS MEASURED.

How: the model is built on the meta device at full FLUX.1-dev width and run under a dispatch mode
that adds up, for every op that is neither a GEMM nor attention nor a view, the bytes of its
tensor inputs (distinct elements: a broadcast reads its source once) and outputs, i.e. what the
op moves when it runs as its own kernel, as eager PyTorch runs it. The rewritten graph is the one
dynamo captures with fastflow's pattern passes applied (fused ops counted the same way: each
reads its inputs once and writes its outputs once); the passes that hand ops to inductor are not
applied, and inductor's own fusion of what remains is not modelled. Per block figures come from
models with 1 and 2 blocks of each kind; a step is 19 double + 38 single blocks.

    python bench/compile_bytes.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
from _ops_common import H100_BANDWIDTH, git_sha
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

RESOLUTIONS = (512, 768, 1024)
TXT = 512
DOUBLE, SINGLE = 19, 38
_NOT_COUNTED = ("_unsafe_view", "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "scaled_dot_product",
                "_efficient_attention", "_flash_attention", "_cudnn_attention")  # fmt: skip


def _distinct_bytes(t: torch.Tensor) -> int:
    elements = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            elements *= size
    return elements * t.element_size()


class _Bytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0
        self.in_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.in_attention and not func.is_view and not any(k in name for k in _NOT_COUNTED):
            tensors = {id(t): t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
            self.total += sum(_distinct_bytes(t) for t in tensors.values())
        return out


class _Attention(TorchFunctionMode):
    """Marks the ops inside scaled_dot_product_attention (on meta it runs as its math decomposition),
    so that they are not counted."""

    SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)

    def __init__(self, counter: _Bytes):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in self.SDPA:
            return func(*args, **(kwargs or {}))
        self.counter.in_attention = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.in_attention = False


def _counted(fn, *args, **kwargs) -> int:
    counter = _Bytes()
    with counter, _Attention(counter):
        fn(*args, **kwargs)
    return counter.total


def _model(double: int, single: int):
    import diffusers

    with torch.device("meta"):
        return diffusers.FluxTransformer2DModel(num_layers=double, num_single_layers=single, guidance_embeds=True).to(
            torch.bfloat16
        )


def _inputs(side: int) -> dict:
    from fastflow.models.flux import make_img_ids

    n = (side // 16) ** 2
    dt, meta = torch.bfloat16, torch.device("meta")
    return dict(
        hidden_states=torch.empty(1, n, 64, dtype=dt, device=meta),
        encoder_hidden_states=torch.empty(1, TXT, 4096, dtype=dt, device=meta),
        pooled_projections=torch.empty(1, 768, dtype=dt, device=meta),
        timestep=torch.empty(1, dtype=dt, device=meta),
        img_ids=make_img_ids(side // 16, side // 16).to(meta, dt),
        txt_ids=torch.empty(TXT, 3, dtype=dt, device=meta),
        guidance=torch.empty(1, dtype=dt, device=meta),
    )


def _rewritten_graph(model, inputs):
    """The dynamo graph of ``model(**inputs)`` with fastflow's pattern passes applied, and its inputs."""
    import fastflow.compile as fc

    captured = []

    def backend(gm, example_inputs):
        fc.rewrite(gm, example_inputs, decompose=False)  # the fused ops stay, as on a GPU
        captured.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(**inputs)
    return captured[0]


def count(double: int, single: int, side: int) -> dict[str, int]:
    model, inputs = _model(double, single), _inputs(side)
    out = {}
    with torch.no_grad():
        out["diffusers eager"] = _counted(model, **inputs)
        gm, example_inputs = _rewritten_graph(model, inputs)
        out["fastflow backend"] = _counted(gm, *example_inputs)
    return out


def rows() -> list[dict]:
    result = []
    for side in RESOLUTIONS:
        base, two_double, two_single = count(1, 1, side), count(2, 1, side), count(1, 2, side)
        for variant in base:
            double = two_double[variant] - base[variant]
            single = two_single[variant] - base[variant]
            step = base[variant] - double - single + DOUBLE * double + SINGLE * single
            result.append({"resolution": side, "img_tokens": (side // 16) ** 2, "variant": variant,
                           "double_block_gb": double / 1e9, "single_block_gb": single / 1e9, "step_gb": step / 1e9,
                           "step_ms_at_full_bandwidth": step / H100_BANDWIDTH * 1e3})  # fmt: skip
    return result


def report(table: list[dict]) -> None:
    print("\nnon-GEMM bytes per FLUX.1-dev step (bf16, 512 text tokens; NO TIME MEASURED: bytes / 3.35 TB/s)")
    print(f"  {'resolution':<11} {'variant':<18} {'double blk GB':>13} {'single blk GB':>13} {'step GB':>8} "
          f"{'ms @ H100 BW':>12}")  # fmt: skip
    for r in table:
        print(f"  {r['resolution']:<11} {r['variant']:<18} {r['double_block_gb']:13.3f} {r['single_block_gb']:13.3f} "
              f"{r['step_gb']:8.2f} {r['step_ms_at_full_bandwidth']:12.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    table = rows()
    report(table)
    if args.json:
        with open(args.json, "a") as fh:
            for r in table:
                fh.write(json.dumps({"bench": "compile_bytes", "sha": git_sha(), **r}) + "\n")


if __name__ == "__main__":
    main()
