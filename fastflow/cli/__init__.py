"""The ``fastflow`` command: one module per subcommand, assembled here with the exit-code rules.

Errors from bad input print one line and exit with status 2; an interrupted run exits 130.

Each command module (generate, tune_cache, tune_steps, quantize, info, smoke, tune, doctor)
exposes ``add_parser(sub)``, which registers its arguments and sets ``func``; common.py holds the
argument types several commands share, output.py the writing of images, calibration.py what the
two tuners share. A command
module imports at its top only what building the parser needs (argparse, pathlib, torch,
fastflow.errors): what a command runs (fastflow.api, tuning, caching, quant, kernels) is imported
inside its run function, so ``fastflow generate`` loads only what it runs (tests/test_cli_imports.py).
A new command (e.g. ``serve``) is a module here with ``add_parser(sub)``, imported below and
listed in ``COMMANDS``; nothing else changes.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .. import __version__
from ..errors import FastflowError
from . import doctor, generate, info, quantize, smoke, tune, tune_cache, tune_steps

COMMANDS = (generate, tune_cache, tune_steps, quantize, info, smoke, tune, doctor)  # in `fastflow --help` order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description="Fast FLUX.1 / SD3 inference")
    parser.add_argument("--version", action="version", version=f"fastflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (one line), 130 on Ctrl-C, 1 on a fastflow bug (one
    line asking for a report; the traceback with --debug)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastflowError as e:
        print("fastflow: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fastflow doctor | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as e:  # a bug: one line, the traceback on request
        if getattr(args, "debug", False):
            traceback.print_exc()
        message = " ".join(str(e).split())[:300]
        print(
            f"fastflow: internal error: {type(e).__name__}: {message}. This is a fastflow bug: please report it "
            "with the command you ran"
            + ("" if getattr(args, "debug", False) else " and the output of the same command with --debug"),
            file=sys.stderr,
        )
        return 1
