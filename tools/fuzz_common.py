"""The fuzzers' shared machinery: a worker process per case stream with a per-case time limit and
an address-space cap, the outcome classes, the judging of an exception, and the summary.

Outcomes: ``ok`` and ``typed`` (a FastflowError) pass; every other class is a failure:
``untyped`` (any other exception, a crashed worker), ``mismatch`` (loaded, but not what the file
holds), ``timeout`` (a hang), ``memory`` (over the cap), ``nonfinite`` (an accepted file gives a
non-finite image), ``ignored`` (a field that changes the math neither honoured nor refused),
``refused_valid`` (a valid file or value refused), ``unsafe_print`` (an escape sequence from a file
reached the terminal raw), ``write_outside`` (a file written or changed outside the asked paths).
"""

from __future__ import annotations

import collections
import importlib
import multiprocessing as mp
import os
import sys
import traceback
from pathlib import Path

PASSES = ("ok", "typed")
FAILURES = (
    "untyped",
    "mismatch",
    "timeout",
    "memory",
    "nonfinite",
    "ignored",
    "refused_valid",
    "unsafe_print",
    "write_outside",
)
TOOLS = str(Path(__file__).resolve().parent)


def judge_exception(e: BaseException) -> dict:
    """The outcome of a case that raised ``e``: typed, memory or untyped (with the trace)."""
    from fastflow.errors import FastflowError

    if isinstance(e, FastflowError):
        return {"outcome": "typed", "error": f"{type(e).__name__}: {e}"[:200]}
    if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        return {"outcome": "memory", "error": f"{type(e).__name__}: {e}"[:200]}
    return {
        "outcome": "untyped",
        "error": f"{type(e).__name__}: {e}"[:300],
        "trace": traceback.format_exc()[-1500:],
    }


def peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _resolve(target: str):
    module, name = target.split(":")
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    return getattr(importlib.import_module(module), name)


def _worker(conn, target: str, args: tuple, memory_bytes: int) -> None:
    import resource
    import warnings

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import transformers

    import fastflow  # noqa: F401  (imports before the cap, so the cap measures the cases only)

    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    run = _resolve(target)
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + memory_bytes, resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        case = conn.recv()
        if case is None:
            return
        try:
            result = run(case, *args)
        except BaseException as e:  # noqa: BLE001 - the runner itself must never die on a case
            result = {"case": case, **judge_exception(e)}
            if not isinstance(e, Exception):
                result["outcome"] = "untyped"
        conn.send(result)


class Runner:
    """A worker process fed one case at a time (``target(case, *args)``, "module:function" in
    tools/); restarted after a timeout or a crash."""

    def __init__(self, target: str, args: tuple, timeout: float, memory_bytes: int):
        self.args = (target, args, memory_bytes)
        self.timeout, self.proc = timeout, None

    def _start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()
        child.close()  # so a worker that dies is an EOF here at once, not a wait for the time limit
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, case) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(case)
        if self.conn.poll(self.timeout):
            try:
                return self.conn.recv()
            except EOFError:  # the worker died: its pipe closes a moment before the process is reaped
                self.proc.join(10)
        alive = self.proc.is_alive()
        self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.proc = None
        # a worker that died on its own: killed by the kernel's OOM killer (-9) or crashed
        outcome = "timeout" if alive else "memory" if code == -9 else "untyped"
        return {"case": case, "outcome": outcome, "error": f"worker {'timed out' if alive else f'exit code {code}'}"}

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


def counts_line(results: list[dict]) -> str:
    counts = collections.Counter(r["outcome"] for r in results)
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in (*PASSES, *FAILURES))


def failure_lines(results: list[dict], limit: int = 20, describe=lambda r: "") -> list[str]:
    """One line per failure (at most ``limit``), the first of each class first."""
    failed = [r for r in results if r["outcome"] in FAILURES]
    firsts = {}
    for r in failed:
        firsts.setdefault(r["outcome"], r)
    ordered = list(firsts.values()) + [r for r in failed if r not in firsts.values()]
    lines = []
    for r in ordered[:limit]:
        lines.append(f"  FAIL case {r['case']} {describe(r)}: {r['outcome']} {r.get('error', '')}")
        if r.get("trace"):
            lines.append("    " + r["trace"].strip().splitlines()[-3].strip())
    return lines
