"""``fastflow tune-steps``: search k step sigmas that follow a fine-step trajectory, then refine
them on whole-run quality (FD-digits, or PSNR to the fine run)."""

from __future__ import annotations

from pathlib import Path

import torch

from .calibration import read_prompts, tuning_parser, tuning_pipe


def add_parser(sub) -> None:
    p = tuning_parser(sub, "tune-steps", "search k step sigmas that follow a fine-step trajectory", 4)
    p.add_argument("--fine", type=int, default=64, help="steps of the reference trajectory")
    p.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="skip the coordinate descent on whole-run quality (FD-digits, or PSNR to the fine run)",
    )
    p.add_argument("-o", "--out", default=None, help="write {sigmas: [...]} here")
    p.set_defaults(func=tune_steps)


def tune_steps(args) -> int:
    import json

    from ..tuning import Calibration, fine_trajectory, refine_steps, search_steps

    pipe = tuning_pipe(args)
    given = read_prompts(args, pipe)
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
