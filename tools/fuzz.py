"""Fuzz fastflow's newer surfaces: LoRA and FP8 files, SDXL folders, tokenizers and prompts, the CLI
and image metadata, caches, and pipeline arguments (the checkpoint loaders: tools/fuzz_loader.py).

Each case runs in a worker process with a time limit and an address-space cap (tools/fuzz_common.py,
which also lists the outcome classes). Exit status 1 on any failure class.

    python tools/fuzz.py --cases 200 --seed 0                    # CI round, < 2 min on 2 cores
    python tools/fuzz.py --cases 2000 --seed 1 --json out.json   # on demand
    python tools/fuzz.py --cases 300 --surface lora --surface fp8
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_common import FAILURES, PASSES, Runner, counts_line, failure_lines  # noqa: E402

# surface -> (module, weight in a mixed round)
SURFACES = {
    "lora": ("fuzz_weights", 3),
    "fp8": ("fuzz_weights", 2),
    "sdxl": ("fuzz_sdxl", 2),
    "text": ("fuzz_text", 2),
    "cli": ("fuzz_cli", 1),
    "cache": ("fuzz_cache", 2),
    "args": ("fuzz_args", 3),
}


def dispatch(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    """Run one (surface, index) case in the worker."""
    import importlib

    module = importlib.import_module(SURFACES[case[0]][0])
    return module.run_case(case, seed, seeds_root / SURFACES[case[0]][0], work / f"{case[0]}{case[1]}")


def plan(cases: int, seed: int, surfaces: list[str]) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    weights = [SURFACES[s][1] for s in surfaces]
    return [(rng.choices(surfaces, weights)[0], i) for i in range(cases)]


def fuzz(
    cases: int,
    seed: int = 0,
    surfaces=None,
    timeout: float = 30.0,
    memory_gb: float = 3.0,
    progress=True,
    json_path=None,
):
    import importlib

    surfaces = list(surfaces or SURFACES)
    todo = plan(cases, seed, surfaces)
    with tempfile.TemporaryDirectory(prefix="fastflow-fuzz-") as tmp:
        root = Path(tmp)
        for module in sorted({SURFACES[s][0] for s, _ in todo}):
            (root / "seeds" / module).mkdir(parents=True)
            importlib.import_module(module).build_seeds(root / "seeds" / module)
        (root / "work").mkdir()
        runner = Runner("fuzz:dispatch", (seed, root / "seeds", root / "work"), timeout, int(memory_gb * 2**30))
        results = []
        try:
            for n, case in enumerate(todo, 1):
                t0 = time.perf_counter()
                r = runner.run(case)
                r.setdefault("surface", case[0])
                r["seconds"] = round(time.perf_counter() - t0, 3)
                results.append(r)
                if json_path and n % 25 == 0:  # a long round can be read (and stopped) part way
                    Path(json_path).write_text(json.dumps(results, indent=1))
                if progress and n % 50 == 0:
                    print(f"{n}/{len(todo)} {counts_line(results)}", file=sys.stderr, flush=True)
        finally:
            runner.close()
        return results


def summarize(results: list[dict], seconds: float) -> str:
    lines = [f"{len(results)} cases in {seconds:.0f} s: {counts_line(results)}"]
    by = collections.defaultdict(list)
    for r in results:
        by[r["surface"]].append(r)
    for surface in SURFACES:
        if by[surface]:
            slowest = max(r.get("seconds", 0) for r in by[surface])
            lines.append(f"  {surface:6s} {len(by[surface]):5d}: {counts_line(by[surface])} (slowest {slowest:.1f} s)")
    lines += failure_lines(results, 30, lambda r: f"{r['surface']} [{r.get('desc', '')[:160]}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--surface", action="append", choices=sorted(SURFACES), help="repeat; default: all")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="address-space cap per case")
    parser.add_argument("--json", default=None, help="write every case's result here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = fuzz(args.cases, args.seed, args.surface, args.timeout, args.memory_gb, json_path=args.json)
    print(summarize(results, time.perf_counter() - t0))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    assert set(PASSES) | set(FAILURES) >= {r["outcome"] for r in results}
    return 1 if any(r["outcome"] in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
