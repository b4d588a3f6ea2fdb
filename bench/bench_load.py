"""Checkpoint loading benchmark: wall time and peak resident memory.

Writes a synthetic FLUX-layout bf16 checkpoint (full FLUX width, fewer blocks, >= --gb GB) and an
FP8 one (e4m3 linear weights with per-channel scales, the rest bf16, as `fastflow quantize` writes
it; >= --gb GB too), then loads each in a fresh process and reports

    peak RSS over the interpreter's baseline  /  bytes of the loaded weights

Targets: bf16 -> bf16 / fp32 and FP8 -> FP8: <= 1.15 (memory-mapped reads, no second full copy);
bf16 quantized to FP8 while loading: <= 1.15 x the FP8 bytes + the largest bf16 tensor (never the
whole model in bf16). A benchmark, not a CI test.

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


def _fp8_layers(cfg: FluxConfig) -> set[str]:
    """Weight keys the default Fp8Config quantizes."""
    from fastflow.models import Flux
    from fastflow.quant import Fp8Config, quantizable

    with torch.device("meta"):
        return {name + ".weight" for name in quantizable(Flux(cfg), Fp8Config())}


def write_checkpoint(path: Path, cfg: FluxConfig, fp8: bool = False) -> int:
    """Stream a safetensors file tensor by tensor (never the whole model in memory): bf16, or the
    default FP8 layers as e4m3 codes + fp32 per-channel ``weight_scale``."""
    from fastflow.quant import quantize_weight

    shapes = _meta_state(cfg)
    quantized = _fp8_layers(cfg) if fp8 else set()
    entries = []  # (key, dtype name, shape, bytes per element)
    for key, shape in shapes.items():
        if key in quantized:
            entries += [(key, "F8_E4M3", shape, 1), (key[: -len("weight")] + "weight_scale", "F32", shape[:1], 4)]
        else:
            entries.append((key, "BF16", shape, 2))
    header, offset = {}, 0
    if fp8:
        header["__metadata__"] = {"fastflow.quant": "fp8-e4m3", "fastflow.activation": "per-token"}
    for key, dtype, shape, size in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size * shape.numel()]}
        offset += size * shape.numel()
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        for key, shape in shapes.items():
            w = (0.02 * torch.randn(shape, generator=gen)).bfloat16()
            if key in quantized:
                q, scale = quantize_weight(w)
                f.write(q.view(torch.uint8).numpy().tobytes())
                f.write(scale.numpy().tobytes())
            else:
                f.write(w.view(torch.int16).numpy().tobytes())
    return offset


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def child(path: str, dtype_name: str, cfg_json: str, quant: str) -> None:
    import fastflow  # noqa: F401  (import cost belongs to the baseline)
    from fastflow.loading import load_transformer

    cfg = FluxConfig(name="flux-bench", **json.loads(cfg_json))  # the blocks of bench_config
    dtype = getattr(torch, dtype_name)
    import gc

    gc.collect()
    baseline = _current_rss()  # resident now (import-time transients are not part of loading)
    t0 = time.perf_counter()
    model = load_transformer(path, config=cfg, dtype=dtype, quant=None if quant == "auto" else quant)
    seconds = time.perf_counter() - t0
    peak = _peak_rss()
    loaded = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(
        json.dumps(
            {
                "dtype": dtype_name,
                "quant": quant,
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
    parser.add_argument("--child", nargs=4, metavar=("PATH", "DTYPE", "CONFIG", "QUANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    cfg = bench_config(int(args.gb * 1e9))
    cfg8 = bench_config(int(2 * args.gb * 1e9))  # twice the parameters: an FP8 file of about --gb
    largest_bf16 = max(2 * s.numel() for s in _meta_state(cfg).values())
    tmp = tempfile.mkdtemp(dir=args.dir)
    path, path8 = Path(tmp) / "flux-bench.safetensors", Path(tmp) / "flux-bench-fp8.safetensors"
    files = {}
    for file, config, fp8 in ((path, cfg, False), (path8, cfg8, True)):
        t0 = time.perf_counter()
        files[file] = write_checkpoint(file, config, fp8)
        print(
            f"wrote {file} ({files[file] / 1e9:.2f} GB {'FP8' if fp8 else 'bf16'}; depth={config.depth}, "
            f"single={config.depth_single_blocks}) in {time.perf_counter() - t0:.1f} s"
        )
    runs = [  # (file, config, dtype, quant, allowance over 1.15 x loaded bytes)
        (path, cfg, "bfloat16", "none", 0),
        (path, cfg, "float32", "none", 0),
        (path, cfg, "bfloat16", "fp8", largest_bf16),
        (path8, cfg8, "bfloat16", "auto", 0),
    ]
    rows = []
    try:
        for file, config, dtype, quant, allowance in runs:
            cfg_json = json.dumps({"depth": config.depth, "depth_single_blocks": config.depth_single_blocks})
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(file), dtype, cfg_json, quant],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            limit = 1.15 * row["loaded_bytes"] + allowance
            row.update(
                git=git_sha(),
                torch=torch.__version__,
                python=platform.python_version(),
                cpu_count=os.cpu_count(),
                file_bytes=files[file],
                limit_bytes=limit,
                ok=row["peak_rss"] - row["baseline_rss"] <= limit,
            )
            rows.append(row)
            what = f"{file.name} -> {dtype}" + ("" if quant == "none" else f" quant={quant}")
            print(
                f"{what:>45}: {row['seconds']:.2f} s, loaded {row['loaded_bytes'] / 1e9:.2f} GB, peak RSS "
                f"{row['peak_rss'] / 1e9:.2f} GB over a {row['baseline_rss'] / 1e9:.2f} GB baseline -> "
                f"{row['ratio']:.3f}x the loaded bytes (limit {limit / row['loaded_bytes']:.3f}x: "
                f"{'OK' if row['ok'] else 'OVER TARGET'})"
            )
    finally:
        if not args.keep:
            for file in files:
                file.unlink(missing_ok=True)
            os.rmdir(tmp)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
