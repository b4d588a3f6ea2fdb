"""DeepCache on the embedded UNet digits model: a Pareto table of UNet block work, wall time and quality.

    python bench/deepcache.py                                  # intervals 2..5, every branch, both schedules
    python bench/deepcache.py --per-digit 50 --md docs/deepcache_table.md
    python bench/deepcache.py --random --per-digit 2           # a random tiny SDXL (develops the bench)

Per setting: the share of UNet blocks computed (``out.stats``: one block = one entry of
input_blocks, middle_block or output_blocks), the denoise wall-time ratio to no cache (runs
alternating in this process, median of ``--reps``), FD-digits and prompt accuracy from
fastflow.evaluation (``--per-digit`` images per digit, the same seeds as the no-cache row), and FD
against no cache. The no-cache row comes first, from the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import fastflow
from fastflow.caching import DeepCache
from fastflow.evaluation import PER_DIGIT, Yardstick, generate

MODEL = "fastflow-tiny-digits-unet"


def load(model: str, random: bool):
    if random:  # tests' tiny random SDXL folder: only exercises the bench (its FD means nothing)
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import tiny_pipeline_folder

        folder = Path(tempfile.mkdtemp()) / "sdxl-tiny"
        tiny_pipeline_folder(folder, "sdxl-tiny")
        model = str(folder)
    pipe = fastflow.load(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_ratio(pipe, policy, call: dict, reps: int) -> float:
    """Median over ``reps`` of (denoise time with the policy) / (without), runs alternating."""
    ratios = []
    for _ in range(reps):
        base = pipe(**call).timings["denoise"]
        ratios.append(pipe(**call, cache=policy).timings["denoise"] / base)
    return statistics.median(ratios)


def settings(intervals, branches, schedules) -> list[tuple[str, DeepCache | None]]:
    rows: list[tuple[str, DeepCache | None]] = [("none", None)]
    for schedule in schedules:
        for n in intervals:
            for b in branches:
                rows.append((f"N{n} B{b} {schedule}", DeepCache(interval=n, branch=b, schedule=schedule)))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL)
    p.add_argument("--random", action="store_true", help="a random tiny SDXL instead of --model")
    p.add_argument("--per-digit", type=int, default=PER_DIGIT, help="images per digit (50: 500 images)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--branches", type=int, nargs="+", default=None, help="default: every skip branch")
    p.add_argument("--schedules", nargs="+", default=["uniform", "nonuniform"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--base-fd",
        type=float,
        default=None,
        help="skip the no-cache row, taking its FD-digits from an earlier run (same seeds, same images)",
    )
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load(args.model, args.random)
    steps = args.steps or pipe.defaults["steps"]
    branches = args.branches if args.branches is not None else list(range(len(pipe.unet.input_blocks)))
    extra = {"height": 32, "width": 32} if args.random else {}
    stick = Yardstick()
    timing_call = {"prompt": ["a handwritten four"] * 4, "seed": 0, "output_type": "latent",
                   "num_inference_steps": steps, **extra}  # fmt: skip
    header = ["setting", "UNet blocks computed", "work saved", "time ratio", "FD-digits", "FD vs none", "accuracy"]
    lines = [
        f"{pipe.config.name if not args.random else 'random sdxl-tiny'}, {steps} steps, "
        f"{args.per_digit * 10} images per row, FD floor {stick.fd_floor:.3f}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    print("\n".join(lines), flush=True)
    rows, base_fd = [], args.base_fd
    for name, policy in settings(args.intervals, branches, args.schedules)[args.base_fd is not None :]:
        t0 = time.perf_counter()
        works: list[dict] = []
        images, labels = generate(pipe, args.per_digit, stats=works, num_inference_steps=steps, cache=policy, **extra)
        score = stick.score(images, labels)
        computed = sum(w["blocks_computed"] for w in works) / sum(w["blocks_total"] for w in works)
        ratio = 1.0 if policy is None else time_ratio(pipe, policy, timing_call, args.reps)
        fd = score["fd_digits"]
        base_fd = fd if policy is None else base_fd
        row = {"setting": name, "computed": computed, "saved": 1 - computed, "time_ratio": ratio, "fd": fd,
               "fd_vs_none": fd / base_fd - 1, "accuracy": score["prompt_accuracy"],
               "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        line = (f"| {name} | {computed:.3f} | {1 - computed:.0%} | {ratio:.3f} | {fd:.4f} | "
                f"{row['fd_vs_none']:+.1%} | {row['accuracy']:.3f} |")  # fmt: skip
        lines.append(line)
        print(line, flush=True)
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "per_digit": args.per_digit, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
