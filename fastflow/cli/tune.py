"""``fastflow tune``: time every attention implementation on this GPU and keep the fastest
(the table fastflow/ops/attention_backends.py reads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="time every attention implementation on this GPU and keep the fastest")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated of: flux, sd3.5-large, sd3.5-medium attn2 (default: all)",
    )
    p.add_argument("--device", default=None, help="cuda (default) or cuda:N")
    p.add_argument("--json", default=None, help="also write the timing rows here")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops import attention_backends as ab

    shapes = None
    if args.shapes:
        from ..kernels.attention import ATTENTION_SHAPES

        names = [n.strip() for n in args.shapes.split(",")]
        unknown = [n for n in names if n not in ATTENTION_SHAPES]
        if unknown:
            raise InputError(f"unknown attention shapes {unknown}; choose from {sorted(ATTENTION_SHAPES)}")
        shapes = {n: ATTENTION_SHAPES[n] for n in names}
    device = torch.device(args.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError("fastflow tune measures attention on a CUDA GPU; none is visible to torch")
    rows = ab.tune(device, shapes)
    print(f"{'shape':<20} {'dtype':<9} {'backend':<18} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        timing = f"{r['ms']:8.3f} {r['tflops']:8.1f}" if "ms" in r else f"{'-':>8} {'-':>8}  {r['error']}"
        print(f"{r['shape']:<20} {r['dtype']:<9} {r['backend']:<18} {timing}{'  <- chosen' if r['chosen'] else ''}")
    print(f"wrote {ab.table_path()} ({ab.machine_key(device)})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
