"""The ``fastflow`` command: one module per subcommand, assembled here with the exit-code rules.

Errors from bad input print one line and exit with status 2; an interrupted run exits 130.

Each command module (generate, tune_cache, tune_steps, quantize, info, smoke, tune, doctor, serve)
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
import signal
import sys
import threading
import traceback
import warnings

from .. import __version__
from ..errors import FastflowError
from . import doctor, generate, info, quantize, serve, smoke, tune, tune_cache, tune_steps
from .common import safe_text

COMMANDS = (generate, tune_cache, tune_steps, quantize, info, smoke, tune, doctor, serve)  # in `fastflow --help` order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description="Fast FLUX.1 / SD3 inference")
    parser.add_argument("--version", action="version", version=f"fastflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for p in sub.choices.values():  # --debug on every command, declared once
        if "--debug" not in p._option_string_actions:
            p.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP during a command: unwinds like Ctrl-C (saves remove their partial files)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    raise Terminated(signum)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings from a command: ``fastflow: warning: MESSAGE`` on one line (no source line)."""
    try:
        (file or sys.stderr).write(f"fastflow: warning: {safe_text(str(message), 500)}\n")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (one line), 130 on Ctrl-C, 1 on a fastflow bug (one
    line asking for a report; the traceback with --debug)."""
    args = build_parser().parse_args(argv)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
                handlers[sig] = signal.signal(sig, _terminate)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except FastflowError as e:
        print("fastflow: error: " + safe_text(str(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print("fastflow: " + ("interrupted" if signum == signal.SIGINT else "terminated"), file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:  # the reader went away (`fastflow doctor | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as e:  # a bug: one line, the traceback on request
        if getattr(args, "debug", False):
            traceback.print_exc()
        message = safe_text(str(e), 300)
        print(
            f"fastflow: internal error: {type(e).__name__}: {message}. This is a fastflow bug: please report it "
            "with the command you ran"
            + ("" if getattr(args, "debug", False) else " and the output of the same command with --debug"),
            file=sys.stderr,
        )
        return 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
