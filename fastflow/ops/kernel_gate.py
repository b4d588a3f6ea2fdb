"""Which kernels of an op may run on this GPU: those ``fastflow tune`` checked and timed here and
that beat the op's reference under torch.compile (``kernels.json`` of the cache root).

Entry per op and machine (:func:`tune_table.machine_key`: GPU, torch, Triton, fastflow)::

    {"backend": "triton" | "cuda_cpp" | "reference",   # what dispatch runs: the fastest winner
     "speedup": 1.8,                                   # its speedup over the compiled reference
     "reference_ms": 0.41,                             # the compiled reference, summed over the cases
     "candidates": {"triton": 1.8, "cuda_cpp": "loses: 0.93x"}}  # each kernel: speedup, or why not

:func:`won` gives the kernels the "kernels" backend may dispatch for an op, fastest first; a kernel
that lost or failed is not among them, and where none won the op runs its reference. Where the
table has no entry for the op on this machine (never tuned) dispatch is unchanged: the first
available of :data:`fastflow.ops.KERNEL_BACKENDS`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import cache_root, tune_table

TABLE = "kernels.json"
MAX_TABLE_DEPTH = 4  # {machine: {op: {"candidates": {backend: speedup or why}}}}
ENTRY_KEYS = {"backend", "speedup", "reference_ms", "candidates"}


def table_path() -> Path:
    return cache_root.root() / TABLE


def _valid_entry(e) -> bool:
    if not (isinstance(e, dict) and set(e) == ENTRY_KEYS and isinstance(e["backend"], str)):
        return False
    cands = e["candidates"]
    return (
        tune_table.finite_number(e["speedup"])
        and tune_table.finite_number(e["reference_ms"])
        and isinstance(cands, dict)
        and all(
            isinstance(b, str)
            and (
                (tune_table.finite_number(v) and v >= 0)
                or (isinstance(v, str) and len(v) <= tune_table.MAX_ERROR_CHARS)
            )
            for b, v in cands.items()
        )
        and (e["backend"] == "reference" or tune_table.finite_number(cands.get(e["backend"])))
    )


def _valid_table(data) -> bool:
    return isinstance(data, dict) and all(
        isinstance(m, str)
        and isinstance(t, dict)
        and all(isinstance(op, str) and _valid_entry(e) for op, e in t.items())
        for m, t in data.items()
    )


def read_table(path: Path | None = None, strict: bool = False) -> dict:
    """The kernel table; {} where there is none or it cannot be used (ignored with a warning)."""
    shape = "{GPU: {op: {backend, speedup, reference_ms, candidates}}}"
    return tune_table.read(path or table_path(), MAX_TABLE_DEPTH, _valid_table, shape, "kernel", strict)


@functools.cache
def _table() -> dict:
    return read_table()  # read (and warned about) once, until forget()


def forget() -> None:
    """Drop the in-memory copy of the table (after ``tune`` rewrote it)."""
    _table.cache_clear()


def winners(entry: dict) -> tuple[str, ...]:
    """The candidates of a table entry that beat the compiled reference, fastest first."""
    timed = {b: v for b, v in entry["candidates"].items() if not isinstance(v, str) and v > 1.0}
    return tuple(sorted(timed, key=lambda b: -timed[b]))


def entry(op: str, device: torch.device | None = None) -> dict | None:
    """The table's entry for ``op`` on ``device``'s GPU (default: the current one); None where
    it was not tuned there (or there is no table, or no GPU)."""
    table = _table()
    if not table:
        return None
    try:
        if device is None or device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        machine = tune_table.machine_key(device)
    except (RuntimeError, AssertionError):  # no CUDA here
        return None
    return table.get(machine, {}).get(op)


def won(op: str, device: torch.device | None = None) -> tuple[str, ...] | None:
    """The kernel backends the "kernels" backend may dispatch for ``op`` on ``device``, fastest
    first (empty: none won, the reference runs); None where ``op`` was not tuned on this GPU."""
    found = entry(op, device)
    return None if found is None else winners(found)
