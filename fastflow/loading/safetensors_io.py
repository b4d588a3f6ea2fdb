"""Validated, memory-mapped reading of one safetensors file.

We parse and check the header ourselves before touching data (safetensors' own reader accepts
some malformed files and reports others with messages that do not say what to do), then hand out
zero-copy tensor views over a private memory map. After a tensor has been copied into the model,
:meth:`SafetensorsFile.release` drops its pages from our resident set (MADV_DONTNEED), so loading
never holds a second full copy of the weights, mapped or not.
"""

from __future__ import annotations

import json
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
    TruncatedFileError,
    UnsupportedDtypeError,
)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
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


def refuse_unsafe_file(path: Path) -> None:
    """Refuse pickle checkpoints by name or magic bytes, and Git LFS pointers."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(
            path,
            f"'{path.suffix}' files are Python pickles, which can run arbitrary code when loaded",
            "fastflow never loads pickles: use the model's .safetensors file, or convert this one "
            "once in a trusted environment (safetensors.torch.save_file)",
        )
    with open(path, "rb") as f:
        head = f.read(len(_LFS_MAGIC))
    if head.startswith(_LFS_MAGIC):
        raise LfsPointerError(
            path,
            "this is a Git LFS pointer file, not the weights",
            "run `git lfs pull` in the repository (or download the file itself)",
        )
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise PickleRefusedError(
            path,
            "this file is a pickle / torch.save archive despite its name",
            "fastflow never loads pickles: use the model's .safetensors file",
        )


class SafetensorsFile:
    """One safetensors file: validated header, metadata, and tensor views over a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        refuse_unsafe_file(self.path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
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
            header_bytes = f.read(n_header)
        self.data_offset = 8 + n_header
        self.metadata, self.entries = self._parse_header(header_bytes, size - self.data_offset)
        self._mmap: mmap.mmap | None = None

    def _parse_header(self, header_bytes: bytes, data_size: int):
        try:
            header = json.loads(header_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeaderError(
                self.path,
                f"header is not valid JSON ({e})",
                "the file is corrupt or not safetensors: re-download it",
            ) from None
        if not isinstance(header, dict):
            raise HeaderError(self.path, "header is not a JSON object", "re-download the file")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise HeaderError(self.path, "__metadata__ is not a JSON object", "re-download the file")
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            entries[name] = self._entry(name, info)
        self._check_layout(entries, data_size)
        return {str(k): str(v) for k, v in metadata.items()}, entries

    def _entry(self, name: str, info) -> TensorEntry:
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise HeaderError(
                self.path,
                f"malformed header entry for tensor {name!r}: {info!r}",
                "the file is corrupt: re-download it",
            ) from None
        if dtype_name not in DTYPES:
            raise UnsupportedDtypeError(
                self.path,
                f"tensor {name!r} has dtype {dtype_name!r}, which fastflow cannot read "
                f"(supported: {', '.join(DTYPES)})",
                "convert the checkpoint to bf16, fp16 or fp32 safetensors",
            )
        dtype = DTYPES[dtype_name]
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise TensorLayoutError(
                self.path,
                f"tensor {name!r} has a negative size or offset",
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
        return TensorEntry(name, dtype, shape, begin, end)

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
            with open(self.path, "rb") as f:
                # Private copy-on-write map: writable views for torch.frombuffer, never written back.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
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
