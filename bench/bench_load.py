"""Checkpoint loading benchmark: wall time and peak resident memory.

Writes a synthetic FLUX-layout bf16 checkpoint (full FLUX width, fewer blocks, >= --gb GB), then
loads it in a fresh process per target dtype (bf16, fp32) and reports

    peak RSS over the interpreter's baseline  /  bytes of the loaded weights

Target: <= 1.15 (memory-mapped reads, no second full copy). A benchmark, not a CI test.

    python bench/bench_load.py --gb 2.2 [--dir /tmp] [--keep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _ops_common import git_sha

from fastflow.models.configs import FluxConfig


def bench_config(target_bytes: int) -> FluxConfig:
    """Full-width FLUX (3072, 24 heads) with as many double/single blocks as reach target_bytes."""
    cfg = FluxConfig(name="flux-bench", depth=1, depth_single_blocks=1)
    while _nbytes(cfg) < target_bytes:
        cfg = cfg.replace(depth_single_blocks=cfg.depth_single_blocks + 1)
        if _nbytes(cfg) < target_bytes:
            cfg = cfg.replace(depth=cfg.depth + 1)
    return cfg


def _meta_state(cfg: FluxConfig) -> dict[str, torch.Size]:
    from fastflow.models import Flux

    with torch.device("meta"):
        return {k: v.shape for k, v in Flux(cfg).state_dict().items()}


def _nbytes(cfg: FluxConfig) -> int:
    return sum(2 * s.numel() for s in _meta_state(cfg).values())


def write_checkpoint(path: Path, cfg: FluxConfig) -> int:
    """Stream a bf16 safetensors file tensor by tensor (never the whole model in memory)."""
    shapes = _meta_state(cfg)
    header, offset = {}, 0
    for key, shape in shapes.items():
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + 2 * shape.numel()],
        }
        offset += 2 * shape.numel()
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for shape in shapes.values():
            f.write((0.02 * torch.randn(shape, generator=gen)).bfloat16().view(torch.int16).numpy().tobytes())
    return offset


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child(path: str, dtype_name: str, cfg_json: str) -> None:
    import fastflow  # noqa: F401  (import cost belongs to the baseline)
    from fastflow.loading import load_transformer

    cfg = FluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items()})
    dtype = getattr(torch, dtype_name)
    import gc

    gc.collect()
    baseline = _current_rss()  # resident now (import-time transients are not part of loading)
    t0 = time.perf_counter()
    model = load_transformer(path, config=cfg, dtype=dtype)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "dtype": dtype_name,
                "seconds": seconds,
                "baseline_rss": baseline,
                "peak_rss": peak,
                "loaded_bytes": loaded,
                "ratio": (peak - baseline) / loaded,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.2, help="checkpoint size in GB (1e9 bytes), bf16")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint file")
    parser.add_argument("--json", default=None, help="append result rows to this JSON-lines file")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "DTYPE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    cfg = bench_config(int(args.gb * 1e9))
    tmp = tempfile.mkdtemp(dir=args.dir)
    path = Path(tmp) / "flux-bench.safetensors"
    t0 = time.perf_counter()
    size = write_checkpoint(path, cfg)
    print(
        f"wrote {path} ({size / 1e9:.2f} GB bf16; depth={cfg.depth}, single={cfg.depth_single_blocks}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    cfg_json = json.dumps({k: v for k, v in cfg.__dict__.items()})
    rows = []
    try:
        for dtype in ("bfloat16", "float32"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(path), dtype, cfg_json],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(
                git=git_sha(),
                torch=torch.__version__,
                python=platform.python_version(),
                cpu_count=os.cpu_count(),
                file_bytes=size,
            )
            rows.append(row)
            verdict = "OK" if row["ratio"] <= 1.15 else "OVER TARGET"
            print(
                f"{dtype:>9}: {row['seconds']:.2f} s, loaded {row['loaded_bytes'] / 1e9:.2f} GB, peak RSS "
                f"{row['peak_rss'] / 1e9:.2f} GB over a {row['baseline_rss'] / 1e9:.2f} GB baseline -> "
                f"{row['ratio']:.3f}x the loaded bytes (target <= 1.15: {verdict})"
            )
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            os.rmdir(tmp)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0 if all(r["ratio"] <= 1.15 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
