"""Region-adaptive sampling (RAS) on the embedded FLUX digits model: a Pareto table.

    python bench/ras.py                      # 50 images per digit (500), 28 steps
    python bench/ras.py --per-digit 5 --steps 12   # a quick look

Per row: the block work computed (RAS counts a block run on k of N image tokens as (T + k) / (T + N)
of a block, T text tokens), the wall-time ratio to no cache (denoise stage, alternating runs, median
of 3, same process), FD-digits and prompt accuracy from fastflow.evaluation at the same seeds as the
no-cache row. The embedded model is 16x16 pixels: an 8x8 latent, 16 image tokens after 2x2 packing
(and 8 text tokens), so a token-level method has little to cut; the table says what it gives.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _ops_common import git_sha
from caching import SCHEDULES, embedded, side_by_side

from fastflow.caching import RAS, FBCache, Schedule
from fastflow.evaluation import PER_DIGIT, Yardstick, generate


def rows(steps: int) -> list[tuple[str, object]]:
    front = [Schedule.load(p) for p in sorted(SCHEDULES.glob(f"*-{steps}steps-work*.json"))]
    ecad = min(front, key=lambda s: abs(s.work - 0.34)) if front else None
    out = [("none", None)]
    out += [(f"ras {r}", RAS(r)) for r in (0.75, 0.5, 0.25)]
    out += [("ras 0.5 full_every 3", RAS(0.5, full_every=3))]
    out += [("fbcache 0.2", FBCache(0.2)), ("ras 0.75 + fbcache 0.2", RAS(0.75, blocks=FBCache(0.2)))]
    if ecad is not None:
        out += [(f"ecad {ecad.work:.2f}", ecad), (f"ras 0.75 + ecad {ecad.work:.2f}", RAS(0.75, blocks=ecad))]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-digit", type=int, default=PER_DIGIT)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (none is always run)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    pipe, stick = embedded(), Yardstick()
    timing_call = {
        "prompt": ["a handwritten four"] * 4,
        "seed": 0,
        "output_type": "latent",
        "num_inference_steps": args.steps,
    }
    header = ["policy", "block work computed", "time ratio", "FD-digits", "FD vs none", "accuracy"]
    lines = [
        f"RAS on fastflow-tiny-digits (16 image + 8 text tokens), {args.steps} steps, {10 * args.per_digit} images, "
        f"fastflow {git_sha()}; FD floor {stick.fd_floor:.3f}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    print("\n".join(lines), flush=True)
    base_fd = None
    for name, policy in rows(args.steps):
        if args.only and name != "none" and name not in args.only:
            continue
        works = []
        images, labels = generate(pipe, args.per_digit, stats=works, num_inference_steps=args.steps, cache=policy)
        score = stick.score(images, labels)
        computed = sum(w["blocks_computed"] for w in works) / sum(w["blocks_total"] for w in works)
        ratio = 1.0 if policy is None else side_by_side(pipe, policy, timing_call)
        base_fd = score["fd_digits"] if policy is None else base_fd
        row = [name, computed, ratio, score["fd_digits"], score["fd_digits"] / base_fd - 1, score["prompt_accuracy"]]
        line = "| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |"
        lines.append(line)
        print(line, flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    raise SystemExit(main())
