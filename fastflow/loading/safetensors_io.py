"""Validated, memory-mapped reading of one safetensors file.

We parse and check the header ourselves before touching data (safetensors' own reader accepts
some malformed files and reports others with messages that do not say what to do), then hand out
zero-copy tensor views over a private memory map. After a tensor has been copied into the model,
:meth:`SafetensorsFile.release` drops its pages from our resident set (MADV_DONTNEED), so loading
never holds a second full copy of the weights, mapped or not.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import torch

from ..errors import (
    HeaderError,
    LfsPointerError,
    PickleRefusedError,
    TensorLayoutError,
    TooLargeError,
    TruncatedFileError,
    UnsupportedDtypeError,
)
from .files import open_regular, parse_json

MAX_HEADER_BYTES = 32 * 1024 * 1024  # FLUX.1-dev: 100 KB; safetensors allows 100 MB, no model needs it
MAX_TENSORS = 100_000  # FLUX.1-dev holds 780, SD3.5-large ~1,200; bounds header work and memory
MAX_RANK = 8  # our tensors have rank <= 4
_INT64_MAX = 2**63 - 1
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """The first bytes are a header length that fits the file, followed by a JSON object."""
    if len(head) < 9:
        return False
    (n_header,) = struct.unpack("<Q", head[:8])
    return 2 <= n_header <= size - 8 and head[8:].lstrip(b" \t\r\n")[:1] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    """A zip archive (torch.save) or a pickle stream opening with a PROTO 2-5 opcode."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def refuse_unsafe_file(path: Path) -> None:
    """Refuse pickle checkpoints by name or content, Git LFS pointers, and non-regular files.

    A file whose first 8 bytes are a header length that fits the file, followed by ``{``, is
    safetensors (its header is validated next) whatever its first byte: a header length of
    128 mod 256 starts with ``\x80``, which is also pickle's first opcode."""
    _refuse_by_name(path)
    fd, size = open_regular(path, "weights file")
    try:
        _refuse_by_content(path, fd, size)
    finally:
        os.close(fd)


def _refuse_by_name(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            path,
            f"'{path.suffix}' files are Python pickles, which can run arbitrary code when loaded",
            "fastflow never loads pickles: use the model's .safetensors file, or convert this one "
            "once in a trusted environment (safetensors.torch.save_file)",
        )


def _refuse_by_content(path: Path, fd: int, size: int) -> None:
    """The content half of :func:`refuse_unsafe_file`, on an open descriptor."""
    head = os.pread(fd, 64, 0)
    if _looks_like_safetensors(head, size):
        return
    if head.startswith(_LFS_MAGIC):
        raise LfsPointerError(
            path,
            "this is a Git LFS pointer file, not the weights",
            "run `git lfs pull` in the repository (or download the file itself)",
        )
    if _looks_like_pickle(head):
        raise PickleRefusedError(
            path,
            "this file is a pickle / torch.save archive despite its name",
            "fastflow never loads pickles: use the model's .safetensors file",
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SafetensorsFile:
    """One safetensors file: validated header, metadata, and tensor views over a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _refuse_by_name(self.path)  # before opening: a pickle is never opened
        fd, size = open_regular(self.path, "weights file")
        try:
            _refuse_by_content(self.path, fd, size)
            raw = os.pread(fd, 8, 0)
            if len(raw) < 8:
                raise TruncatedFileError(
                    self.path,
                    f"file is {size} bytes, too short for a safetensors header",
                    "re-download or re-copy the file",
                )
            (n_header,) = struct.unpack("<Q", raw)
            if n_header > MAX_HEADER_BYTES:
                raise HeaderError(
                    self.path,
                    f"header length field says {n_header} bytes (limit {MAX_HEADER_BYTES}); "
                    "this is not a safetensors file or it is corrupt",
                    "check that the path points to a .safetensors weights file",
                )
            if 8 + n_header > size:
                raise TruncatedFileError(
                    self.path,
                    f"file is {size} bytes but its header alone needs {8 + n_header}",
                    "the download or copy was interrupted: fetch the file again",
                )
            header_bytes = os.pread(fd, n_header, 8)
        finally:
            os.close(fd)
        self.size = size
        self.data_offset = 8 + n_header
        self.metadata, self.entries = self._parse_header(header_bytes, size - self.data_offset)
        self._mmap: mmap.mmap | None = None

    def _parse_header(self, header_bytes: bytes, data_size: int):
        if header_bytes.count(b'"data_offsets"') > MAX_TENSORS:  # every entry has one: refuse before parsing
            raise self._too_many()
        objects = 0

        def count_objects(pairs):  # bounds the work before a huge header is fully built
            nonlocal objects
            objects += 1
            if objects > MAX_TENSORS + 2:
                raise self._too_many()
            return dict(pairs)

        header = parse_json(header_bytes, self.path, "header", max_depth=3, object_pairs_hook=count_objects)
        if not isinstance(header, dict):
            raise HeaderError(self.path, "header is not a JSON object", "re-download the file")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise HeaderError(
                self.path, "__metadata__ is not a JSON object of strings", "the file is corrupt: re-download it"
            )
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            entries[name] = self._entry(name, info)
        self._check_layout(entries, data_size)
        return metadata, entries

    def _too_many(self) -> TooLargeError:
        return TooLargeError(
            self.path,
            f"the header describes more than {MAX_TENSORS} tensors",
            "no model fastflow loads has that many: the file is corrupt or not a checkpoint",
        )

    def _malformed(self, name: str, info, problem: str) -> HeaderError:
        shown = repr(info)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        return HeaderError(
            self.path,
            f"malformed header entry for tensor {name!r} ({problem}): {shown}",
            "the file is corrupt: re-download it",
        )

    def _entry(self, name: str, info) -> TensorEntry:
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise self._malformed(name, info, "needs dtype, shape and data_offsets")
        dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str):
            raise self._malformed(name, info, "dtype is not a string")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(s) for s in shape):
            raise self._malformed(name, info, f"shape is not a list of at most {MAX_RANK} integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise self._malformed(name, info, "data_offsets is not a pair of integers")
        begin, end = offsets
        if dtype_name not in DTYPES:
            raise UnsupportedDtypeError(
                self.path,
                f"tensor {name!r} has dtype {dtype_name[:40]!r}, which fastflow cannot read "
                f"(supported: {', '.join(DTYPES)})",
                "convert the checkpoint to bf16, fp16 or fp32 safetensors",
            )
        dtype = DTYPES[dtype_name]
        if any(s < 0 or s > _INT64_MAX for s in shape) or begin < 0 or end < begin or end > _INT64_MAX:
            raise TensorLayoutError(
                self.path,
                f"tensor {name!r} has a negative or out-of-range size or offset",
                "the file is corrupt: re-download it",
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != prod(shape) * itemsize:
            raise TensorLayoutError(
                self.path,
                f"tensor {name!r} spans {end - begin} bytes but shape {list(shape)} of "
                f"{dtype_name} needs {prod(shape) * itemsize}",
                "the file is corrupt: re-download it",
            )
        return TensorEntry(name, dtype, tuple(shape), begin, end)

    def _check_layout(self, entries: dict[str, TensorEntry], data_size: int) -> None:
        position = 0
        for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
            if e.begin < position:
                raise TensorLayoutError(
                    self.path,
                    f"tensor {e.name!r} overlaps the previous tensor's data",
                    "the file is corrupt or hand-made: re-download or re-save it",
                )
            if e.begin > position:
                raise TensorLayoutError(
                    self.path,
                    f"there is a gap of {e.begin - position} bytes before tensor {e.name!r}",
                    "the file is corrupt: re-download or re-save it",
                )
            position = e.end
        if position > data_size:
            raise TruncatedFileError(
                self.path,
                f"tensor data runs to byte {position} but the file holds only {data_size} bytes of data",
                "the download or copy was interrupted: fetch the file again",
            )
        if position < data_size:
            raise TensorLayoutError(
                self.path,
                f"{data_size - position} bytes after the last tensor belong to no tensor",
                "the file is corrupt: re-download or re-save it",
            )

    # -- data access ---------------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            fd, size = open_regular(self.path, "weights file")
            try:
                if size != self.size:  # mapping a shrunk file would fault (SIGBUS) on access
                    raise TruncatedFileError(
                        self.path,
                        f"the file changed size while loading ({self.size} -> {size} bytes)",
                        "wait for the copy or download to finish, then load again",
                    )
                # Private copy-on-write map: writable views for torch.frombuffer, never written back.
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        return self._mmap

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy CPU view of tensor ``name`` (valid until :meth:`close`)."""
        e = self.entries[name]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=e.dtype)
        flat = torch.frombuffer(self._map(), dtype=torch.uint8, count=e.nbytes, offset=self.data_offset + e.begin)
        return flat.view(e.dtype).view(e.shape)

    def release(self, name: str) -> None:
        """Drop the pages of tensor ``name`` from our resident set (they stay in the page cache)."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        e = self.entries[name]
        page = mmap.PAGESIZE
        start = -(-(self.data_offset + e.begin) // page) * page  # only whole pages inside the tensor
        stop = (self.data_offset + e.end) // page * page
        if stop > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view is still alive; the map goes when it does
                pass
            self._mmap = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
