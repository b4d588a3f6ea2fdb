"""The CPU thread rule shared by the Python API and the CLI: small models run on 1 thread, whose
matmuls are too small to share between cores (issue 17 measured the embedded model 15x slower on 2
threads than on 1; issue 31 measured a warm embedded-model image at 0.10 s on 1 thread and 1.23 s
on 2 on a loaded machine); real models keep torch's default (all cores). ``FASTFLOW_NUM_THREADS``
overrides the rule (the CLI's ``--threads`` overrides both)."""

from __future__ import annotations

import contextlib
import os
import threading

import torch

from ..errors import InputError

SMALL_MODEL_PARAMS = 50_000_000  # below this, matmuls are too small to share between cores


def env_threads(value=None, source: str = "--threads") -> int | None:
    """``value`` (the CLI's --threads), else FASTFLOW_NUM_THREADS, else None (chosen from the
    model's size), checked to be a thread count."""
    if value is None and os.environ.get("FASTFLOW_NUM_THREADS"):
        value, source = os.environ["FASTFLOW_NUM_THREADS"], "FASTFLOW_NUM_THREADS"
    if value is None:
        return None
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if not 1 <= threads <= 1024:
        raise InputError(f"{source} must be a thread count from 1 to 1024, got {value!r}")
    return threads


def cpu_threads(pipe) -> int:
    """Threads for a CPU run of ``pipe`` by the rule above (without FASTFLOW_NUM_THREADS)."""
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return 1 if params < SMALL_MODEL_PARAMS else torch.get_num_threads()


_lock = threading.Lock()
_active = 0  # CPU generations running under threads_for_call
_saved: int | None = None  # torch's setting before the first of them


@contextlib.contextmanager
def threads_for_call(pipe):
    """Within the block (one pipeline call), torch runs on the thread count the rule gives for a
    CPU pipeline; torch's setting is restored when the last overlapping call ends. torch's thread
    count is one process-wide setting: calls running at the same time share it (the first one in
    sets it, the last one out restores it, under a lock), so a caller's own ``torch.set_num_threads``
    made during a call is undone when the calls end. A GPU pipeline is left alone, and so is a
    pipeline whose ``num_threads`` is None (the caller manages torch's setting, as the CLI does);
    an int ``num_threads`` is used instead of the rule."""
    global _active, _saved
    chosen = getattr(pipe, "num_threads", "auto")
    try:
        on_cpu = torch.device(pipe.device).type == "cpu"
    except (AttributeError, RuntimeError, StopIteration):
        on_cpu = False
    if not on_cpu or chosen is None:
        yield
        return
    if chosen == "auto":
        want = env_threads(source="FASTFLOW_NUM_THREADS") or cpu_threads(pipe)
    else:
        want = env_threads(chosen, "pipe.num_threads")
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            if want != _saved:
                torch.set_num_threads(want)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0 and _saved is not None and torch.get_num_threads() != _saved:
                torch.set_num_threads(_saved)
