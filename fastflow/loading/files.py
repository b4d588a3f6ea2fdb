"""Opening the files a load touches: regular files only, never blocking, bounded reads.

Every weights, index, config and tokenizer file goes through :func:`open_regular` (a FIFO, device,
socket or directory named like a checkpoint is refused instead of hanging or failing untyped) and
JSON goes through :func:`read_json` (size, nesting depth and non-finite numbers bounded).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from ..errors import CheckpointError, HeaderError, NotARegularFileError, TooLargeError
from ..ops.cache_root import json_depth  # in ops, which reads the attention table with it

MAX_JSON_BYTES = 64 * 1024 * 1024  # a T5 tokenizer.json is 2.4 MB, a sharded index ~100 KB
MAX_JSON_DEPTH = 64  # real configs nest 3-5 levels


def file_mode() -> int:
    """The mode a new file gets under the user's umask (0644 under umask 022): for outputs written
    through mkstemp (0600) and renamed into place (images, `fastflow quantize` files)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def open_regular(path: Path, what: str = "file") -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size; refuses anything but a regular file.

    Opened with O_NONBLOCK so that a FIFO cannot block the open; checked with fstat on the
    descriptor itself, so a path swapped after a stat cannot slip through."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise _not_regular(path, what, "a directory") from None
    except OSError as e:
        raise CheckpointError(
            path, f"cannot open the {what} ({e.strerror})", "check the path and its permissions"
        ) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a device or socket"
        )
        raise _not_regular(path, what, kind)
    os.set_blocking(fd, True)
    return fd, st.st_size


def _not_regular(path, what: str, kind: str) -> NotARegularFileError:
    return NotARegularFileError(path, f"the {what} is {kind}, not a regular file", "pass the path of the file itself")


def read_limited(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    fd, size = open_regular(path, what)
    try:
        if size > limit:
            raise TooLargeError(
                path,
                f"the {what} is {size} bytes (limit {limit})",
                "this is not the file fastflow expects: check the path",
            )
        chunks, left = [], size
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _reject_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(
    raw: bytes, path: Path, what: str, allow_constants: bool = False, max_depth: int = MAX_JSON_DEPTH, **hooks
):
    """Parse JSON bytes with bounded nesting; every failure is a :class:`HeaderError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(path, f"{what} is not UTF-8 text ({e})", "the file is corrupt: re-download it") from None
    if json_depth(text) > max_depth:
        raise HeaderError(path, f"{what} nests deeper than {max_depth} levels", "the file is corrupt: re-download it")
    try:
        kwargs = {} if allow_constants else {"parse_constant": _reject_constant, "parse_float": _finite_float}
        return json.loads(text, **kwargs, **hooks)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, huge int literals, hooks' limits
        if isinstance(e, CheckpointError):  # a hook's own typed error
            raise
        raise HeaderError(path, f"{what} is not valid JSON ({e})", "the file is corrupt: re-download it") from None


def read_json(path: Path, what: str, allow_constants: bool = True) -> dict:
    """A JSON object from a regular file of bounded size and depth."""
    data = parse_json(read_limited(path, what), path, what, allow_constants=allow_constants)
    if not isinstance(data, dict):
        raise HeaderError(path, f"{what} is not a JSON object", "re-download the file")
    return data
