"""Render a grid of the embedded model's digits, one row per digit (docs/digits.png).

python tools/digit_grid.py --out docs/digits.png [--per-digit 8] [--scale 8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

import fastflow
from fastflow.loading import DEFAULT_MODEL
from fastflow.pipelines.images import as_uint8

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the PNG to write (docs/digits.png for the README)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--per-digit", type=int, default=8)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = fastflow.load(args.model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for d, word in enumerate(WORDS):
        out = pipe(
            f"a handwritten {word}", num_images_per_prompt=args.per_digit, seed=args.seed + 100 * d, output_type="np"
        )
        framed = [np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=90) for im in as_uint8(out.images)]  # frame
        rows.append(np.concatenate(framed, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), Image.NEAREST)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height}): rows are 'a handwritten zero' ... 'nine'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
