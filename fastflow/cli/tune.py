"""``fastflow tune``: check and time every kernel on this GPU against its reference, and keep only
the winners: attention's fastest implementation (fastflow/ops/attention_backends.py) and, for every
other op with a kernel, the kernels that beat the reference under torch.compile
(fastflow/ops/kernel_gate.py, fastflow/ops/tune_ops.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="time every kernel on this GPU against its reference and keep the winners")
    p.add_argument(
        "--shapes",
        default=None,
        help="attention shapes, comma-separated of: flux, sd3.5-large, sd3.5-medium attn2 (default: all)",
    )
    p.add_argument(
        "--ops",
        default=None,
        help="comma-separated op names to tune (default: attention and every op with a kernel)",
    )
    p.add_argument("--device", default=None, help="cuda (default) or cuda:N")
    p.add_argument("--json", default=None, help="also write the timing rows here")
    p.set_defaults(func=run)


def _attention_shapes(spec: str | None):
    if not spec:
        return None
    from ..kernels.attention import ATTENTION_SHAPES

    names = [n.strip() for n in spec.split(",")]
    unknown = [n for n in names if n not in ATTENTION_SHAPES]
    if unknown:
        raise InputError(f"unknown attention shapes {unknown}; choose from {sorted(ATTENTION_SHAPES)}")
    return {n: ATTENTION_SHAPES[n] for n in names}


def _print_attention(rows) -> None:
    print(f"{'shape':<20} {'dtype':<9} {'backend':<18} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        timing = f"{r['ms']:8.3f} {r['tflops']:8.1f}" if "ms" in r else f"{'-':>8} {'-':>8}  {r['error']}"
        print(f"{r['shape']:<20} {r['dtype']:<9} {r['backend']:<18} {timing}{'  <- chosen' if r['chosen'] else ''}")


def _print_ops(rows) -> None:
    print(f"{'op':<38} {'case':<22} {'backend':<20} {'ms':>8} {'speedup':>8}")
    for r in rows:
        if "ms" in r:
            speedup = f"{r['speedup']:7.2f}x" if "speedup" in r else f"{'':>8}"
            timing = f"{r['ms']:8.3f} {speedup}"
        else:
            timing = f"{'-':>8} {'-':>8}  {r['error']}"
        mark = "  <- dispatched" if r["chosen"] else ""
        print(f"{r['op']:<38} {r['case']:<22} {r['backend']:<20} {timing}{mark}")


def run(args) -> int:
    from ..ops import attention_backends as ab
    from ..ops import kernel_gate, tune_ops

    shapes = _attention_shapes(args.shapes)
    ops = [n.strip() for n in args.ops.split(",")] if args.ops else None
    device = torch.device(args.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError("fastflow tune measures kernels on a CUDA GPU; none is visible to torch")
    out = {}
    if ops is None or "attention" in ops:
        out["attention"] = ab.tune(device, shapes)
        _print_attention(out["attention"])
        print(f"wrote {ab.table_path()} ({ab.machine_key(device)})")
    others = None if ops is None else [n for n in ops if n != "attention"]
    if others is None or others:
        out["ops"] = tune_ops.tune(device, others)
        _print_ops(out["ops"])
        print(f"wrote {kernel_gate.table_path()} ({ab.machine_key(device)})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0
