"""Fit TeaCache's rescaling polynomial for a model: the relative L1 change of block 0's modulated
input between consecutive evaluations (x) against the relative change of the residual of all
blocks (y, what TeaCache reuses), fitted as a degree-4 polynomial y = P(x) on calibration prompts.

    python tools/fit_teacache.py                       # the embedded model, 28 steps
    python tools/fit_teacache.py --model ./FLUX.1-dev --prompts prompts.txt --steps 28

Prints the coefficients (highest power first) for fastflow.caching.TEACACHE_COEFFICIENTS.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import fastflow
from fastflow.caching import relative_change
from fastflow.evaluation import NUMBER_WORDS
from fastflow.loading import DEFAULT_MODEL


class Recorder:
    """A policy that computes everything and records (input change, residual change) pairs."""

    def __init__(self):
        self.pairs: list[tuple[float, float]] = []

    def describe(self) -> str:
        return "record"

    def forward(self, run, step, memory) -> None:
        modulated = run.modulated_input()
        residual = run.compute(0, run.num_blocks)
        if "modulated" in memory:
            self.pairs.append(
                (relative_change(modulated, memory["modulated"]), relative_change(residual, memory["residual"]))
            )
        memory["modulated"], memory["residual"] = modulated, residual


def choose(x: np.ndarray, y: np.ndarray, max_degree: int = 4) -> tuple[np.ndarray, float]:
    """The lowest-degree polynomial whose RMS is within 10% of the best degree's and which stays
    non-negative and increasing over the observed changes (a high degree fitted to clustered
    points swings outside them; TeaCache also clamps the rescaled value at 0)."""
    grid = np.linspace(x.min(), x.max(), 200)
    fits = []
    for degree in range(1, max_degree + 1):
        c = np.polyfit(x, y, degree)
        values = np.polyval(c, grid)
        sane = values.min() >= -1e-3 and np.all(np.diff(values) >= -1e-6)
        fits.append((degree, c, float(np.sqrt(np.mean((np.polyval(c, x) - y) ** 2))), sane))
    best = min(f[2] for f in fits if f[3]) if any(f[3] for f in fits) else min(f[2] for f in fits)
    degree, c, rms, _ = next(f for f in fits if f[3] and f[2] <= 1.1 * best)
    return c, rms


def fit(pipe, prompts, steps: int, seeds: int) -> tuple[np.ndarray, float]:
    recorder = Recorder()
    for i, prompt in enumerate(prompts):
        pipe(
            prompt,
            num_inference_steps=steps,
            seed=[1000 * i + s for s in range(seeds)],
            num_images_per_prompt=seeds,
            output_type="latent",
            cache=recorder,
        )
    x, y = np.array(recorder.pairs).T
    return choose(x, y)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: digit prompts)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--seeds", type=int, default=1, help="images per prompt (one seed each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = fastflow.load(args.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if args.prompts:
        prompts = [p.strip() for p in open(args.prompts, encoding="utf-8") if p.strip()]
    else:
        prompts = [f"a handwritten {w}" for w in NUMBER_WORDS]
    coefficients, rms = fit(pipe, prompts, args.steps, args.seeds)
    print(f"{pipe.config.name}: coefficients (highest power first), fit RMS {rms:.4f}")
    print("(" + ", ".join(f"{c:.8e}" for c in coefficients) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
