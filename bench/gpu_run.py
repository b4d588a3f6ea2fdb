"""The GPU run book in one command: on the first machine with an NVIDIA GPU, run every kernel test
compiled (TRITON_INTERPRET=0), every benchmark, and the attention tuning, and collect one JSON row
per kernel and shape (time, GB/s or TFLOP/s, % of peak) in one file.

    python bench/gpu_run.py [--out gpu_run.jsonl] [--skip-tests] [--only attention groupnorm_silu]

Steps (each logged; a failing step is recorded and the run goes on):
1. ``pytest tests/kernels tests/ops`` with TRITON_INTERPRET=0: the kernel tests on CUDA tensors
   (the whole-model kernel tests build CPU tensors and stay interpreter-only);
2. every ``bench/bench_<op>.py --json OUT`` (fastflow vs torch.compile(reference) vs eager);
3. ``fastflow tune --json``: every attention implementation timed, the fastest kept per GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _step(name: str, cmd: list[str], out: Path, env: dict) -> int:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    with out.open("a") as fh:
        fh.write(json.dumps({"step": name, "returncode": rc, "seconds": time.perf_counter() - start}) + "\n")
    return rc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_run.jsonl")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="bench names, e.g. attention groupnorm_silu")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_run.py needs a CUDA GPU visible to torch; none is (see `fastflow doctor`)", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    env = dict(os.environ, TRITON_INTERPRET="0")
    print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    failed = []
    if not args.skip_tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/ops"]
        failed += ["tests"] if _step("kernel tests (compiled)", cmd, out, env) else []
    benches = sorted(p for p in HERE.glob("bench_*.py") if p.stem != "bench_load")
    for bench in benches:
        name = bench.stem.removeprefix("bench_")
        if args.only and name not in args.only:
            continue
        failed += [name] if _step(f"bench {name}", [sys.executable, str(bench), "--json", str(out)], out, env) else []
    tune = [sys.executable, "-m", "fastflow", "tune", "--json", str(out.with_suffix(".tune.json"))]
    failed += ["tune"] if _step("fastflow tune", tune, out, env) else []
    print(f"rows in {out}; attention timings in {out.with_suffix('.tune.json')}")
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
