"""Run-time compilation of csrc/'s kernels with NVRTC, for GPUs the built ``fastflow._C`` lacks (or
installs without it): the same sources, compiled to a cubin for the GPU's architecture and cached
on disk in ``cubin/`` of fastflow's cache root (``$FASTFLOW_CACHE_DIR`` or ``~/.cache/fastflow``,
see :mod:`fastflow.ops.cache_root`), keyed by the sources, the architecture and the NVRTC version.

Each entry is ``MAGIC``, the sha256 of (its key, the cubin), then the cubin: an entry that is
truncated, planted under another key or not a cubin is recompiled and rewritten, never launched.
A digest only proves the entry is whole: whoever can write the folder could write a matching
digest too, so the real protection is the folder check (owned by this user, writable by nobody
else; otherwise fastflow compiles without caching and warns once).

NVRTC and the CUDA driver are reached through NVIDIA's cuda-python (``cuda-bindings``), which finds
``libnvrtc`` in the ``nvidia-cuda-nvrtc`` wheel (``pip install "fastflow[cuda]"``) or the system's
toolkit. Compiling needs no GPU; loading a cubin and launching from it (:func:`launch`) needs the
NVIDIA driver and runs only on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
from pathlib import Path

from ..errors import CheckpointError, InputError, UnsafeCacheError
from . import cache_root

_log = logging.getLogger(__name__)

# The kernel translation units NVRTC compiles: one per op family (their headers are found by name).
UNITS = {
    "groupnorm_silu": "groupnorm_silu.cuh",
    "fp8_quantize": "fp8_quantize.cuh",
    "qk_norm_rope": "qk_norm_rope.cuh",
}
INSTALL = 'pip install "fastflow[cuda]" (cuda-bindings and the nvidia-cuda-nvrtc wheel)'


def source_dir() -> Path:
    """csrc/ beside this fastflow: ``fastflow/_csrc`` in an installed wheel, the repository's
    ``csrc/`` in a source checkout (editable installs included)."""
    package = Path(__file__).resolve().parents[1]
    for root in (package / "_csrc", package.parent / "csrc"):
        if (root / "ff_common.cuh").is_file():
            return root
    raise InputError(f"the CUDA C++ sources are missing (looked in {package / '_csrc'} and {package.parent / 'csrc'})")


def sources() -> dict[str, str]:
    """name -> text of every csrc/ header."""
    return {p.name: p.read_text() for p in sorted(source_dir().iterdir()) if p.name.endswith((".cuh", ".h"))}


@functools.cache
def library():
    """cuda-python's ``nvrtc`` module with its library loaded; an InputError saying what to install
    when cuda-bindings or libnvrtc is missing."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise InputError(f"NVRTC needs cuda-python: {INSTALL}") from None
    try:
        nvrtc.nvrtcVersion()
    except Exception as e:  # cuda.pathfinder's DynamicLibNotFoundError: no libnvrtc anywhere
        raise InputError(f"NVRTC is not installed ({e}): {INSTALL}, or install the CUDA toolkit") from None
    return nvrtc


def version() -> tuple[int, int]:
    _, major, minor = library().nvrtcVersion()
    return major, minor


def _check(result, what: str, log: str = ""):
    """The values after an nvrtc call's status; a RuntimeError with NVRTC's message (and the
    compile log) when the status is not success."""
    status, *values = result
    if status != library().nvrtcResult.NVRTC_SUCCESS:
        message = library().nvrtcGetErrorString(status)[1].decode()
        raise RuntimeError(f"NVRTC {what}: {message}\n{log}")
    return values[0] if len(values) == 1 else values


def compile_unit(unit: str, arch: str) -> bytes:
    """The cubin of csrc unit ``unit`` (a key of UNITS) for ``arch`` ("80", "89", "90a", ...)."""
    nvrtc = library()
    headers = sources()
    names = list(headers)
    prog = _check(
        nvrtc.nvrtcCreateProgram(
            f'#include "{UNITS[unit]}"\n'.encode(),
            f"{unit}.cu".encode(),
            len(names),
            [headers[n].encode() for n in names],
            [n.encode() for n in names],
        ),
        "create",
    )
    try:
        options = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--device-as-default-execution-space"]
        (status,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        # NVRTC writes into the buffers: bytearrays, never bytes (b" " * 1 is CPython's shared b" ",
        # and an empty log, size 1, would overwrite it with a NUL for the whole process)
        log = bytearray(_check(nvrtc.nvrtcGetProgramLogSize(prog), "log size"))
        _check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
        _check((status,), f"compile of {unit} for sm_{arch}", log.rstrip(b"\0").decode(errors="replace"))
        cubin = bytearray(_check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size"))
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "get cubin")
        return bytes(cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


MAGIC = b"fastflow-cubin-v1\n"
MAX_CUBIN_BYTES = 64 * 1024 * 1024  # the units' cubins are ~0.1-1 MB


def cache_dir() -> Path:
    return cache_root.root() / "cubin"


def _entry(key: str, data: bytes) -> bytes:
    return MAGIC + hashlib.sha256(key.encode() + data).digest() + data


def _verified(key: str, raw: bytes | None) -> bytes | None:
    """The cubin of a cache entry, or None unless it is whole and written for ``key``."""
    if raw is None or not raw.startswith(MAGIC):
        return None
    head = len(MAGIC) + 32
    data = raw[head:]
    if raw[len(MAGIC) : head] != hashlib.sha256(key.encode() + data).digest() or data[:4] != b"\x7fELF":
        return None
    return data


def cubin(unit: str, arch: str) -> bytes:
    """compile_unit through the disk cache: an entry is used only after its digest checks (else
    it is recompiled and rewritten, atomically through a fresh temporary); with no safe cache
    folder the cubin is compiled every time, with one warning."""
    text = "".join(f"{k}\n{v}" for k, v in sorted(sources().items()))
    key = hashlib.sha256(f"{unit}|{arch}|{version()}|{text}".encode()).hexdigest()[:32]
    name = f"{unit}-sm_{arch}-{key}.cubin"
    try:
        with cache_root.folder("cubin") as (fd, where):
            try:
                data = _verified(key, cache_root.read_entry(fd, where / name, MAX_CUBIN_BYTES))
            except (CheckpointError, OSError) as e:  # a symlink, FIFO, device or huge file at its name
                _log.warning("recompiling over an unusable cubin cache entry: %s", e)
                data = None
            if data is None:
                data = compile_unit(unit, arch)
                try:
                    cache_root.write_entry(fd, name, _entry(key, data))
                except OSError as e:  # a full disk: the cubin is still good
                    cache_root.warn_once(
                        f"could not write the cubin cache in {where} ({e.strerror or e}): compiling uncached"
                    )
            return data
    except UnsafeCacheError as e:
        cache_root.warn_once(f"{e}; compiling without the cache", UserWarning)
        return compile_unit(unit, arch)


# -- loading and launching on a GPU (the CUDA driver API through cuda-python) -------------------------
@functools.cache
def driver():
    """cuda-python's ``driver`` module, initialised; an InputError where there is no NVIDIA driver."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        raise InputError(f"NVRTC-compiled kernels need cuda-python: {INSTALL}") from None
    try:
        (status,) = cu.cuInit(0)
    except Exception as e:  # cuda.pathfinder: libcuda.so.1 not found
        raise InputError(f"no NVIDIA driver ({e}): NVRTC-compiled kernels need a GPU") from None
    _driver_check(cu, status, "cuInit")
    return cu


def _driver_check(cu, status, what: str) -> None:
    if status != cu.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver {what}: {cu.cuGetErrorString(status)[1]!r} ({int(status)})")


_PRIMARY: dict[int, object] = {}


def primary_context(device: int):
    """The primary CUDA context of GPU ``device`` (the one torch's runtime uses for it), retained
    once per process and kept."""
    if device not in _PRIMARY:
        cu = driver()
        status, handle = cu.cuDeviceGet(device)
        _driver_check(cu, status, f"cuDeviceGet({device})")
        status, context = cu.cuDevicePrimaryCtxRetain(handle)
        _driver_check(cu, status, f"cuDevicePrimaryCtxRetain({device})")
        _PRIMARY[device] = context
    return _PRIMARY[device]


@contextlib.contextmanager
def on_device(device: int):
    """GPU ``device``'s primary context current on this thread for the block (pushed, then popped),
    whatever context was current before."""
    cu = driver()
    (status,) = cu.cuCtxPushCurrent(primary_context(device))
    _driver_check(cu, status, f"cuCtxPushCurrent(device {device})")
    try:
        yield
    finally:
        cu.cuCtxPopCurrent()


class Module:
    """One unit's cubin loaded into the current CUDA context (:func:`launch` makes it the device's
    primary context); kernels looked up by their C names, valid in that context only."""

    def __init__(self, image: bytes):
        cu = driver()
        self._image = image  # the driver reads it during the load; kept for the module's life
        status, self.handle = cu.cuModuleLoadData(image)
        _driver_check(cu, status, "cuModuleLoadData")
        self.functions: dict[str, object] = {}

    def function(self, name: str):
        if name not in self.functions:
            cu = driver()
            status, fn = cu.cuModuleGetFunction(self.handle, name.encode())
            _driver_check(cu, status, f"cuModuleGetFunction({name})")
            self.functions[name] = fn
        return self.functions[name]


KINDS = {"p": ctypes.c_void_p, "i64": ctypes.c_longlong, "f32": ctypes.c_float}


def kernel_params(args) -> tuple[tuple, tuple]:
    """``args`` (("p", address) | ("i64", int) | ("f32", float), in the kernel's parameter order) as
    cuda-python's ``cuLaunchKernel`` takes them: (the values, their ctypes types)."""
    bad = [kind for kind, _ in args if kind not in KINDS]
    if bad:
        raise ValueError(f"unknown kernel parameter kinds {bad}; use {sorted(KINDS)}")
    return tuple(value for _, value in args), tuple(KINDS[kind] for kind, _ in args)


_MODULES: dict[tuple[str, str, int], Module] = {}  # (unit, arch, device) -> module loaded in its context


def launch(unit: str, arch: str, device: int, name: str, grid, block: int, args, stream: int) -> int:
    """Run kernel ``name`` of ``unit`` (compiled for ``arch``) on GPU ``device``, in its primary
    context: the module is loaded once per device, and a module (or function) loaded for one device
    is never launched on another. ``stream`` must belong to ``device``. Returns the driver's error
    code (0: launched)."""
    cu = driver()
    key = (unit, arch, device)
    gx, gy = (grid, 1) if isinstance(grid, int) else grid
    with on_device(device):
        if key not in _MODULES:
            _MODULES[key] = Module(cubin(unit, arch))
        fn = _MODULES[key].function(name)
        (status,) = cu.cuLaunchKernel(fn, gx, gy, 1, block, 1, 1, 0, cu.CUstream(stream), kernel_params(args), 0)
    return int(status)
