"""Start-up and first-image cost of the embedded model, the first thing a new user sees.

Side by side in one run, alternating (so drift hits both equally), each measured ``--runs`` times
in fresh processes, medians reported:

* ``python -c "import torch"``: the floor no torch program can beat;
* ``fastflow generate "a handwritten seven"``: the whole CLI run (imports, load, one image, PNG);
* in-process: one embedded-model image with ``pipe(prompt)`` in a warm process (median of
  ``--images``; the same prompt each time, whose embeddings the pipeline keeps, and a new prompt
  each time), and the first image after ``fastflow.load`` in a fresh one.

    python bench/startup.py [--runs 7] [--images 20]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IN_PROCESS = r"""
import time
t0 = time.perf_counter()
import fastflow
pipe = fastflow.load("fastflow-tiny-digits")
t1 = time.perf_counter()
pipe("a handwritten seven", seed=0, progress=False)
t2 = time.perf_counter()
times = []
for seed in range(1, {images} + 1):
    t = time.perf_counter()
    pipe("a handwritten seven", seed=seed, progress=False)
    times.append(time.perf_counter() - t)
times.sort()
fresh = []  # a new prompt each time: the text encoders run (no prompt-cache hit)
for seed in range(1, {images} + 1):
    t = time.perf_counter()
    pipe(f"a handwritten seven number {{seed}}", seed=seed, progress=False)
    fresh.append(time.perf_counter() - t)
fresh.sort()
print(t1 - t0, t2 - t1, times[len(times) // 2], fresh[len(fresh) // 2])
"""


def _wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "seven.png"
    torch_cmd = [sys.executable, "-c", "import torch"]
    cli_cmd = [sys.executable, "-m", "fastflow", "generate", "a handwritten seven", "-o", str(out), "--no-progress"]
    bare, cli, imports, first, warm, fresh = [], [], [], [], [], []
    for _ in range(args.runs):
        bare.append(_wall(torch_cmd))
        cli.append(_wall(cli_cmd))
        line = subprocess.run(
            [sys.executable, "-c", IN_PROCESS.format(images=args.images)], check=True, capture_output=True, text=True
        ).stdout.split()
        for store, value in zip((imports, first, warm, fresh), map(float, line), strict=True):
            store.append(value)
    med = statistics.median
    rows = [
        ('python -c "import torch"', f"{med(bare):.2f}"),
        ('fastflow generate "a handwritten seven" (whole run)', f"{med(cli):.2f}"),
        ("  difference (the bar: <= 1.5 s)", f"{med(cli) - med(bare):.2f}"),
        ("import fastflow + fastflow.load (in process)", f"{med(imports):.2f}"),
        ("first image after load", f"{med(first):.3f}"),
        (f"one image, warm, same prompt (median of {args.images})", f"{med(warm):.3f}"),
        (f"one image, warm, a new prompt each (median of {args.images})", f"{med(fresh):.3f}"),
    ]
    print(f"{'median of ' + str(args.runs) + ' runs':<54} seconds")
    for name, value in rows:
        print(f"{name:<54} {value}")


if __name__ == "__main__":
    main()
