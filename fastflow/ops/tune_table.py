"""The tables ``fastflow tune`` writes in fastflow's cache root, read like a stranger's file.

Two tables, one per file, both ``{machine: {key: entry}}`` with the machine key naming the GPU and
every piece of software whose change could change a timing (:func:`machine_key`: GPU name, torch,
Triton and fastflow versions), so a new release of any of them is tuned afresh:

* ``attention.json`` (:mod:`.attention_backends`): per head dim / dtype, the fastest correct
  attention implementation;
* ``kernels.json`` (:mod:`.kernel_gate`): per op, which of its kernels beat the reference under
  torch.compile at the timed shapes, and by how much.

Reading never raises inside an op: a table that cannot be used (not a regular file, too large, too
deep, not JSON, not the table's shape) is ignored with a warning, and so is a cache folder that is
not safely the user's own or cannot be reached at all (unwritable, unsearchable: one warning for
all the tables, :func:`cache_root.warn_once`); ``strict`` (``fastflow tune``, about to write)
raises :class:`UnsafeCacheError` for the folder instead.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError, UnsafeCacheError
from . import cache_root

_log = logging.getLogger(__name__)
MAX_TABLE_BYTES = 1024 * 1024  # a table is a few kilobytes per GPU and software version
MAX_ERROR_CHARS = 200  # why a candidate lost, as stored


def fastflow_version() -> str:
    try:
        return importlib.metadata.version("fastflow")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        return "source"


@functools.cache
def machine_key(device: torch.device) -> str:
    """GPU name and the software whose kernels are timed: a new torch, Triton or fastflow is tuned
    afresh. Cached: every tuned op call asks for it."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{name} | torch {torch.__version__} | triton {triton_version} | fastflow {fastflow_version()}"


def finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]


def read(path: Path, depth: int, valid: Callable[[object], bool], shape: str, what: str, strict: bool = False) -> dict:
    """The table at ``path``; {} where there is none or it cannot be used (see the module
    docstring). ``valid(data)`` checks the JSON shape (described by ``shape`` in the warning)."""
    try:
        if not cache_root.reachable_folder(path.parent):
            return {}
        with cache_root.folder(base=path.parent) as (fd, _):
            raw = cache_root.read_entry(fd, path, MAX_TABLE_BYTES)
        if raw is None:
            return {}
        text = raw.decode("utf-8")
        if cache_root.json_depth(text) > depth:
            raise ValueError(f"it nests deeper than {depth} levels")
        data = json.loads(text)
        if not valid(data):
            raise ValueError(f"it is not {shape}")
        return data
    except UnsafeCacheError as e:
        if strict:
            raise
        cache_root.warn_once(f"{e}; running without the tuning tables (the default kernels)")
        return {}
    except (InputError, OSError, ValueError, RecursionError) as e:  # CheckpointError, UnicodeError, JSON
        if isinstance(e, InputError) and not isinstance(e, CheckpointError):
            raise  # a bad FASTFLOW_CACHE_DIR setting: the user's to fix
        problem = str(e)
    _log.warning(
        "ignoring the %s tuning table %s (%s); using the defaults; run `fastflow tune` to rewrite it",
        what,
        path,
        problem,
    )
    return {}


def write(path: Path, table: dict) -> None:
    """Write ``table`` at ``path`` atomically (refuses a folder that is not safely the user's)."""
    with cache_root.folder(base=path.parent) as (fd, _):
        cache_root.write_entry(fd, path.name, json.dumps(table, indent=1, sort_keys=True).encode())
