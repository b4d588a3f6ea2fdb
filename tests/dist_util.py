"""Run a function on N CPU ranks of a gloo process group, each in its own spawned process, and
collect what every rank returned or raised, with a hard timeout (a hung rank fails the test, it
never hangs the suite).

    results = run_ranks(fn, 4, arg1, arg2, timeout=120)   # fn(arg1, arg2) on ranks 0..3
    values = check_ranks(results)                         # raises if any rank failed

``fn`` must be picklable (a module-level function) and its arguments and return value too; it runs
with the default process group initialised (gloo, rendezvous through a file store: no port to race
for), one torch thread, and torchrun's variables set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR=127.0.0.1, MASTER_PORT a free port). With ``init=False`` the process group is left to
``fn`` (to test code that initialises it from torchrun's environment). Each spawn costs seconds of
imports: run many scenarios inside one ``fn`` and return their results.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import tempfile
import time
import traceback
from datetime import timedelta

GRACE_S = 5.0  # how long the other ranks may still report after one failed (they may be stuck in a collective)


class RankFailure(Exception):
    """What a rank raised (its exception's repr and traceback text), or why it gave no result."""

    def __init__(self, rank: int, message: str, remote_traceback: str = "", exception: BaseException | None = None):
        self.rank = rank
        self.remote_traceback = remote_traceback
        self.exception = exception  # the rank's exception itself where it could be pickled
        super().__init__(f"rank {rank}: {message}")

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.remote_traceback}" if self.remote_traceback else text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, store_path, port, backend, init, timeout, fn, args, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if init:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout)
            )
        try:
            value = fn(*args)
        finally:
            if init and dist.is_initialized():
                dist.destroy_process_group()
        results.put((rank, True, value, ""))
    except BaseException as e:  # noqa: BLE001 - everything a rank raises is reported to the parent
        tb = traceback.format_exc()
        try:
            pickle.dumps(e)
            exc = e
        except Exception:
            exc = None
        results.put((rank, False, exc, f"{type(e).__name__}: {e}\n{tb}"))


def run_ranks(
    fn, world_size: int, *args, timeout: float = 120.0, backend: str = "gloo", init: bool = True
) -> list[object]:
    """``fn(*args)`` on ranks 0..world_size-1; returns one entry per rank, in rank order: its return
    value, or a :class:`RankFailure` (an exception the rank raised, a rank that exited without a
    result, or one still running when ``timeout`` seconds ran out or :data:`GRACE_S` after another
    rank failed; such ranks are terminated). Never raises for a rank's failure: see :func:`check_ranks`."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    done: dict[int, object] = {}
    with tempfile.TemporaryDirectory(prefix="fastflow-ranks-") as tmp:
        store_path = os.path.join(tmp, "store")
        port = _free_port()
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(rank, world_size, store_path, port, backend, init, timeout, fn, args, results),
                daemon=False,  # a rank may start processes of its own; the finally below ends it
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            _collect(procs, results, done, deadline)
        finally:
            for rank, p in enumerate(procs):
                if p.is_alive():
                    p.terminate()
                    p.join(5)
                    if p.is_alive():
                        p.kill()
                    p.join(5)
                    done.setdefault(rank, RankFailure(rank, "terminated: no result in time"))
                else:
                    p.join()
            results.close()
    return [done[rank] for rank in range(world_size)]


def _collect(procs, results, done: dict, deadline: float) -> None:
    failed_at = None
    while len(done) < len(procs):
        now = time.monotonic()
        if now > deadline:
            for rank in range(len(procs)):
                done.setdefault(rank, RankFailure(rank, "timed out (still running: terminated)"))
            return
        if failed_at is not None and now > failed_at + GRACE_S:
            for rank in range(len(procs)):
                done.setdefault(rank, RankFailure(rank, "terminated after another rank failed"))
            return
        try:
            rank, ok, value, tb = results.get(timeout=0.2)
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in done and not p.is_alive()]
            if dead:
                _drain(results, done, timeout=1.0)  # a result may still be in the pipe
                for r in dead:
                    if r not in done:
                        done[r] = RankFailure(r, f"exited with code {procs[r].exitcode} without a result")
                        failed_at = failed_at or time.monotonic()
            continue
        done[rank] = value if ok else RankFailure(rank, "raised", tb, value)
        if not ok and failed_at is None:
            failed_at = time.monotonic()


def _drain(results, done: dict, timeout: float) -> None:
    try:
        while True:
            rank, ok, value, tb = results.get(timeout=timeout)
            done[rank] = value if ok else RankFailure(rank, "raised", tb, value)
    except queue.Empty:
        return


def check_ranks(results: list[object]) -> list[object]:
    """The values of :func:`run_ranks`' results; raises an AssertionError naming every failed rank,
    with its traceback."""
    failures = [r for r in results if isinstance(r, RankFailure)]
    if failures:
        raise AssertionError("\n\n".join(str(f) for f in failures))
    return results
