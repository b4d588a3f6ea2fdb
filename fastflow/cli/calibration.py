"""What ``fastflow tune-cache`` and ``fastflow tune-steps`` share: their common arguments, the model
they load and the calibration set (the embedded model's digit prompts, or --prompts FILE)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..loading.source import DEFAULT_MODEL
from .common import device_and_dtype


def tuning_parser(sub, name: str, help: str, steps: int):
    p = sub.add_parser(name, help=help)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: digit prompts)")
    p.add_argument("--device", default=None)
    return p


def read_prompts(args, pipe) -> list[str] | None:
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


def calibration(pipe, args):
    from ..tuning import Calibration, digits_calibration

    prompts = read_prompts(args, pipe)
    if prompts is None:
        return digits_calibration(pipe, args.steps, args.images_per_prompt)
    return Calibration(pipe, prompts, args.steps, args.images_per_prompt)


def tuning_pipe(args):
    from ..api import load

    model = Path(args.model) if args.model else DEFAULT_MODEL
    device, dtype = device_and_dtype(args.device)
    pipe = load(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
