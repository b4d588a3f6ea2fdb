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
        from ..errors import FastflowError
        from ..loading.files import read_limited

        try:
            lines = read_limited(Path(args.prompts).expanduser(), "--prompts file", 16 << 20).decode("utf-8")
        except FastflowError as e:
            raise InputError(f"--prompts: {getattr(e, 'problem', e)}: pass a text file, one prompt per line") from None
        except UnicodeDecodeError:
            raise InputError(f"--prompts {args.prompts} is not UTF-8 text") from None
        lines = lines.splitlines()
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


def require_digit_metrics(command: str) -> None:
    """The digit calibration scores with scikit-learn and scipy (the `train` / `test` extra)."""
    import importlib.util

    missing = [m for m in ("sklearn", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"fastflow {command} scores the digit calibration set with scikit-learn and scipy "
            f"({' and '.join(missing)} not installed): pip install scikit-learn scipy (or the fastflow[train] "
            "extra), or pass --prompts FILE to score by PSNR to the fine run"
        )


def tuning_pipe(args):
    from ..api import load

    if not args.prompts:
        require_digit_metrics(args.command)

    model = Path(args.model) if args.model else DEFAULT_MODEL
    device, dtype = device_and_dtype(args.device)
    pipe = load(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
