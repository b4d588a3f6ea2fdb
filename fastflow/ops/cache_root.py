"""fastflow's on-disk cache: one root folder, only ever the user's own, read and written safely.

The root is ``$FASTFLOW_CACHE_DIR`` (or ``~/.cache/fastflow``), the one cache variable.
``$FASTFLOW_CACHE``, which once moved the NVRTC cubins alone, is no longer read: where it is set,
one warning says to use ``FASTFLOW_CACHE_DIR``. The root holds ``cubin/`` (:mod:`fastflow.ops.nvrtc`)
and the tuning tables ``attention.json`` and ``kernels.json`` (:mod:`fastflow.ops.tune_table`).

* The setting must be an absolute path: an empty or relative value is an :class:`InputError` (it
  would put the cache in whatever folder the process runs from).
* Every folder (the root, ``cubin/``) is created 0700 and used only if it is a directory owned by
  this user and writable by nobody else (:class:`UnsafeCacheError` otherwise). The callers that
  cache on their own (cubins, the attention table read inside an attention call) then warn once
  and work without the cache; ``fastflow tune``, whose whole job is to write the table, refuses.
  This check is the real protection: whoever can write the folder can write any entry, and any
  digest beside it. A folder that cannot be created, reached or written (a read-only home, a
  ``$HOME`` of another user) is the same case: the op runs uncached, with one warning.
* Folders are opened once and used through their descriptor (``dir_fd``), so a folder swapped
  after the check is never followed. The root may be a symlink to a folder of the user's own (the
  check is on the folder it opens); ``cubin/`` and the entries may not be symlinks.
  Entries are opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be regular files of bounded size
  (a symlink, FIFO or device is refused by type, never read).
* Writes go to a fresh ``O_CREAT | O_EXCL | O_NOFOLLOW`` temporary with a random name in the same
  folder, then ``os.replace``: a planted symlink at any predictable name is never followed.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, NotARegularFileError, TooLargeError, UnsafeCacheError

ENV = "FASTFLOW_CACHE_DIR"
DEPRECATED_ENV = "FASTFLOW_CACHE"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


_warned: set[str] = set()


def warn_once(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """A warning about the cache, given once per process (an op that runs uncached warns once)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, category, stacklevel=3)


def root() -> Path:
    """The cache root from the environment (not created, not checked)."""
    value = os.environ.get(ENV)
    if os.environ.get(DEPRECATED_ENV) is not None:
        warn_once(f"{DEPRECATED_ENV} is no longer read: set {ENV} (the one cache folder: cubins and tuning tables)")
    if value is None:
        try:
            return Path.home() / ".cache" / "fastflow"
        except RuntimeError:  # no $HOME and no home in the password database
            raise UnsafeCacheError(f"no home folder to cache in: set {ENV}") from None
    if not value or not os.path.isabs(value):
        raise InputError(
            f"{ENV}={value!r} is not an absolute path (it would put the cache in the current folder):"
            f" set it to an absolute folder, or unset it for ~/.cache/fastflow"
        )
    return Path(value)


def reachable_folder(path: Path) -> bool:
    """Whether folder ``path`` exists; :class:`UnsafeCacheError` where it cannot be looked at
    (a parent this user may not search: ``Path.exists`` raises PermissionError there)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise UnsafeCacheError(f"cannot reach the fastflow cache folder {path} ({e.strerror}): set {ENV}") from None
    return True


def _check_folder(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif hasattr(os, "getuid") and st.st_uid != os.getuid():
        problem = f"is owned by another user (uid {st.st_uid})"
    elif st.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        raise UnsafeCacheError(
            f"the fastflow cache folder {path} {problem}, so anyone could plant entries in it:"
            f" run `chmod 700 {path}` if it is yours, or set {ENV} to a folder of your own"
        )


def _open_folder(path: Path, dir_fd: int | None = None, follow: bool = True) -> int:
    """A descriptor of folder ``path`` (created 0700 if missing), checked with fstat."""
    name = path if dir_fd is None else path.name
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        pass
    except OSError as e:
        raise UnsafeCacheError(f"cannot create the fastflow cache folder {path} ({e.strerror}): set {ENV}") from None
    flags = os.O_RDONLY | _DIRECTORY | _CLOEXEC | (0 if follow else _NOFOLLOW)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        raise UnsafeCacheError(
            f"cannot open the fastflow cache folder {path} ({e.strerror}; a symlink is refused): set {ENV}"
        ) from None
    try:
        _check_folder(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def folder(sub: str | None = None, base: Path | None = None):
    """``(descriptor, path)`` of the checked cache root (or ``base``), or of its subfolder ``sub``."""
    base = root() if base is None else base
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnsafeCacheError(f"cannot create the fastflow cache folder {base} ({e.strerror}): set {ENV}") from None
    fd = _open_folder(base)
    try:
        if sub is None:
            yield fd, base
            return
        sub_fd = _open_folder(base / sub, dir_fd=fd, follow=False)
        try:
            yield sub_fd, base / sub
        finally:
            os.close(sub_fd)
    finally:
        os.close(fd)


def read_entry(dir_fd: int, path: Path, limit: int) -> bytes | None:
    """The bytes of entry ``path.name`` in the folder ``dir_fd``; None if there is none. A symlink,
    FIFO, device or folder (NotARegularFileError) or a file over ``limit`` bytes (TooLargeError)
    is refused without reading it."""
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink under O_NOFOLLOW
        raise NotARegularFileError(
            path, f"the cache entry cannot be opened as a plain file ({e.strerror})", "delete it"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(path, "the cache entry is not a regular file", "delete it")
        if st.st_size > limit:
            raise TooLargeError(path, f"the cache entry is {st.st_size} bytes (limit {limit})", "delete it")
        os.set_blocking(fd, True)
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:  # grew after the fstat
            raise TooLargeError(path, f"the cache entry is over {limit} bytes", "delete it")
        return data
    finally:
        os.close(fd)


def write_entry(dir_fd: int, name: str, data: bytes) -> None:
    """Write ``data`` as entry ``name`` atomically: a fresh temporary (O_EXCL | O_NOFOLLOW, random
    name) in the same folder, then os.replace (which replaces a planted symlink, never follows it)."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """Maximum nesting of ``[``/``{`` outside strings, without recursion (run before parsing)."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(itertools.accumulate(_DEPTH_STEP[c] for c in brackets), default=0)
