"""``fastflow tune-cache``: search caching schedules on a calibration set (the Pareto front of
quality against block work), one JSON per point."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .calibration import calibration, tuning_parser, tuning_pipe


def add_parser(sub) -> None:
    p = tuning_parser(sub, "tune-cache", "search caching schedules (Pareto front of quality vs block work)", 28)
    p.add_argument("--budget", type=float, default=0.3, help="least share of block work a schedule computes")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--groups", type=int, default=None, help="block groups per step (default: one per block)")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ras",
        type=float,
        default=None,
        metavar="RATIO",
        help="search with region-adaptive sampling on at this ratio (docs/ras.md); the JSON runs with it",
    )
    p.add_argument("-o", "--out", default="schedules", help="folder for one JSON per Pareto point")
    p.set_defaults(func=tune_cache)


def tune_cache(args) -> int:
    from ..caching import RAS, Schedule
    from ..caching.ras import check_ratio
    from ..tuning import search_schedules

    pipe = tuning_pipe(args)
    cal = calibration(pipe, args)
    groups = args.groups or pipe.transformer.num_blocks
    if not 1 <= groups <= pipe.transformer.num_blocks:
        raise InputError(f"--groups must be from 1 to the model's {pipe.transformer.num_blocks} blocks")
    ras = None if args.ras is None else check_ratio(args.ras)

    def policy(mask):  # the search's block work is the mask's; RAS's token share comes on top
        return Schedule(mask) if ras is None else RAS(ras, blocks=Schedule(mask))

    front = search_schedules(
        lambda mask: cal.loss(policy(mask)),
        args.steps,
        groups,
        budget=args.budget,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        log=print,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'work':>6} {cal.loss_name:>14}  schedule")
    for c in front:
        info = {"model": pipe.config.name, "steps": args.steps, "work": round(c.work, 4), cal.loss_name: c.loss}
        tag = ""
        if ras is not None:
            info["ras_ratio"], tag = ras, f"-ras{ras:g}"
        path = out / f"{pipe.config.name}-{args.steps}steps{tag}-work{c.work:.3f}.json"
        Schedule(c.mask, info=info).save(path)
        print(f"{c.work:>6.3f} {c.loss:>14.4f}  {path}")
    return 0
