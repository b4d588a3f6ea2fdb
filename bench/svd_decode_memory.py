"""Peak CPU memory (RSS) of SVD's temporal-decoder VAE decoding a clip in chunks of
``decode_chunk_size`` frames: one fresh process per chunk size (peak RSS only grows within a
process), the real SVD VAE widths (``svd-vae``: 128 / 256 / 512 / 512 channels, random weights)
at a small frame size, float32, one torch thread.

Reports, per chunk size: the process's peak RSS, its RSS just before decoding (weights, latents,
the output buffer) and the difference (what decoding added), and the decode wall time (shared
machine: informative only).

    python bench/svd_decode_memory.py [--chunks 1 2 4 8] [--frames 8] [--size 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(chunk: int, frames: int, size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from fastflow.models.vae_video import VIDEO_VAE_CONFIGS, VideoAutoEncoder

    torch.manual_seed(0)
    with torch.device("meta"):
        vae = VideoAutoEncoder(VIDEO_VAE_CONFIGS["svd-vae"])
    vae = vae.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in vae.parameters():  # random, no construction-time init peak
            p.normal_(0, 0.02) if p.ndim > 1 else p.zero_()
        latents = torch.randn(1, frames, 4, size // 8, size // 8)
        vae.decode_chunks(latents[:, :1], 1, 1)  # warm up (allocator, kernels) on one frame
        base = _rss_now()
        start = time.perf_counter()
        out = vae.decode_chunks(latents, frames, chunk)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    assert out.shape == (1, 3, frames, size, size)
    return {
        "chunk": chunk,
        "peak_rss": peak,
        "before_decode_rss": base,
        "decode_added": peak - base,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="frame height and width in pixels (multiple of 8)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.frames, args.size)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for chunk in args.chunks:
        cmd = [sys.executable, __file__, "--child", str(chunk), "--frames", str(args.frames), "--size", str(args.size)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 1 << 20
    print(f"svd-vae decode, {args.frames} frames of {args.size}x{args.size}, float32, 1 thread")
    print(f"{'chunk':>5} {'peak RSS MiB':>13} {'before MiB':>11} {'added MiB':>10} {'seconds':>8}")
    for r in rows:
        print(
            f"{r['chunk']:>5} {r['peak_rss'] / mib:>13.0f} {r['before_decode_rss'] / mib:>11.0f} "
            f"{r['decode_added'] / mib:>10.0f} {r['seconds']:>8.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"frames": args.frames, "size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
