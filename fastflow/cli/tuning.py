"""``fastflow tune-cache`` and ``fastflow tune-steps``: search caching schedules and step sigmas
on a calibration set (the embedded model's digit prompts, or --prompts FILE)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..loading.components import DEFAULT_MODEL
from .common import device_and_dtype


def _tuning_parser(sub, name: str, help: str, steps: int):
    p = sub.add_parser(name, help=help)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: digit prompts)")
    p.add_argument("--device", default=None)
    return p


def add_parser(sub) -> None:
    p = _tuning_parser(sub, "tune-cache", "search caching schedules (Pareto front of quality vs block work)", 28)
    p.add_argument("--budget", type=float, default=0.3, help="least share of block work a schedule computes")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--groups", type=int, default=None, help="block groups per step (default: one per block)")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default="schedules", help="folder for one JSON per Pareto point")
    p.set_defaults(func=tune_cache)

    p = _tuning_parser(sub, "tune-steps", "search k step sigmas that follow a fine-step trajectory", 4)
    p.add_argument("--fine", type=int, default=64, help="steps of the reference trajectory")
    p.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="skip the coordinate descent on whole-run quality (FD-digits, or PSNR to the fine run)",
    )
    p.add_argument("-o", "--out", default=None, help="write {sigmas: [...]} here")
    p.set_defaults(func=tune_steps)


def _read_prompts(args, pipe) -> list[str] | None:
    """--prompts FILE (one per line); None for the embedded model's own digit prompts."""
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InputError(f"cannot read --prompts {args.prompts}: {e.strerror}") from None
        prompts = [p.strip() for p in lines if p.strip()]
        if not prompts:
            raise InputError(f"{args.prompts} holds no prompts (one per line)")
        return prompts
    if pipe.config.name != "fastflow-tiny-digits":
        raise InputError("pass --prompts FILE (calibration prompts, one per line) for this model")
    return None


def _calibration(pipe, args):
    from ..tuning import Calibration, digits_calibration

    prompts = _read_prompts(args, pipe)
    if prompts is None:
        return digits_calibration(pipe, args.steps, args.images_per_prompt)
    return Calibration(pipe, prompts, args.steps, args.images_per_prompt)


def _tuning_pipe(args):
    from ..api import load

    model = Path(args.model) if args.model else DEFAULT_MODEL
    device, dtype = device_and_dtype(args.device)
    pipe = load(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tune_cache(args) -> int:
    from ..caching import Schedule
    from ..tuning import search_schedules

    pipe = _tuning_pipe(args)
    calibration = _calibration(pipe, args)
    groups = args.groups or pipe.transformer.num_blocks
    if not 1 <= groups <= pipe.transformer.num_blocks:
        raise InputError(f"--groups must be from 1 to the model's {pipe.transformer.num_blocks} blocks")
    front = search_schedules(
        lambda mask: calibration.loss(Schedule(mask)),
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
    print(f"{'work':>6} {calibration.loss_name:>14}  schedule")
    for c in front:
        info = {"model": pipe.config.name, "steps": args.steps, "work": round(c.work, 4), calibration.loss_name: c.loss}
        path = out / f"{pipe.config.name}-{args.steps}steps-work{c.work:.3f}.json"
        Schedule(c.mask, info=info).save(path)
        print(f"{c.work:>6.3f} {c.loss:>14.4f}  {path}")
    return 0


def tune_steps(args) -> int:
    import json

    from ..tuning import Calibration, fine_trajectory, refine_steps, search_steps

    pipe = _tuning_pipe(args)
    given = _read_prompts(args, pipe)
    if given is None:
        from ..evaluation import NUMBER_WORDS

        prompts = [f"a handwritten {w}" for w in NUMBER_WORDS]
    else:
        prompts = given
    grid = torch.linspace(1, 0, args.fine + 1)
    runs = [(grid, fine_trajectory(pipe, p, 1000 + i, grid)) for i, p in enumerate(prompts)]
    sigmas = search_steps(runs, args.steps)
    print("trajectory-following sigmas:", ", ".join(f"{s:.4f}" for s in sigmas))
    result = {"model": pipe.config.name, "steps": args.steps, "sigmas": sigmas, "fine": args.fine}
    if args.refine:
        if given is None:
            from ..tuning import digits_calibration

            calibration = digits_calibration(pipe, args.steps)
        else:
            calibration = Calibration(pipe, prompts, args.steps, reference={"num_inference_steps": args.fine})
        uniform = [1 - i / args.steps for i in range(args.steps)]
        sigmas, loss = refine_steps(lambda s: calibration.loss(sigmas=s), [uniform, sigmas], args.fine)
        result.update(
            sigmas=sigmas,
            **{calibration.loss_name: loss, "uniform " + calibration.loss_name: calibration.loss(sigmas=uniform)},
        )
        print(
            "refined on the calibration set:",
            ", ".join(f"{s:.4f}" for s in sigmas),
            f"({calibration.loss_name} {loss:.4f})",
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result))
        print(f"wrote {args.out} (pass the list as sigmas=...)")
    return 0
