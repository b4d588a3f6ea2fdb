"""Run-time compilation of csrc/'s kernels with NVRTC, for GPUs the built ``fastflow._C`` lacks (or
installs without it): the same sources, compiled to a cubin for the GPU's architecture and cached
on disk (``$FASTFLOW_CACHE`` or ``~/.cache/fastflow/cubin``), keyed by the sources, the
architecture and the NVRTC version.

NVRTC is called through ctypes (``libnvrtc``: the ``nvidia-cuda-nvrtc`` wheel's, which CUDA builds
of torch install, or the system's): no CuPy, no cuda-python, no GPU needed to compile. Loading a
cubin and launching from it (:func:`launch`) uses the CUDA driver (libcuda) and runs only on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
from pathlib import Path

from ..errors import InputError

# The kernel translation units NVRTC compiles: one per op family (their headers are found by name).
UNITS = {
    "groupnorm_silu": "groupnorm_silu.cuh",
    "fp8_quantize": "fp8_quantize.cuh",
    "qk_norm_rope": "qk_norm_rope.cuh",
}


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
def library() -> ctypes.CDLL:
    """libnvrtc: the nvidia-cuda-nvrtc wheel's first, then the system's."""
    candidates = []
    try:
        import nvidia

        for root in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    candidates += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for name in candidates:
        if "builtins" in name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise InputError("NVRTC is not installed: pip install nvidia-cuda-nvrtc (or install the CUDA toolkit)")


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def _check(code: int, what: str, log: str = "") -> None:
    if code != 0:
        lib = library()
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(code).decode()}\n{log}")


def compile_unit(unit: str, arch: str) -> bytes:
    """The cubin of csrc unit ``unit`` (a key of UNITS) for ``arch`` ("80", "89", "90a", ...)."""
    lib = library()
    headers = sources()
    main = f'#include "{UNITS[unit]}"\n'
    names = list(headers)
    prog = ctypes.c_void_p()
    _check(
        lib.nvrtcCreateProgram(
            ctypes.byref(prog),
            main.encode(),
            f"{unit}.cu".encode(),
            len(names),
            (ctypes.c_char_p * len(names))(*(headers[n].encode() for n in names)),
            (ctypes.c_char_p * len(names))(*(n.encode() for n in names)),
        ),
        "create",
    )
    try:
        options = [f"--gpu-architecture=sm_{arch}", "-std=c++17", "--device-as-default-execution-space"]
        code = lib.nvrtcCompileProgram(
            prog, len(options), (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        )
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        _check(code, f"compile of {unit} for sm_{arch}", log.value.decode(errors="replace"))
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetCUBIN(prog, cubin), "get cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFLOW_CACHE", Path.home() / ".cache" / "fastflow")) / "cubin"


def cubin(unit: str, arch: str) -> bytes:
    """compile_unit through the disk cache (written atomically; a corrupt entry is recompiled)."""
    text = "".join(f"{k}\n{v}" for k, v in sorted(sources().items()))
    key = hashlib.sha256(f"{unit}|{arch}|{version()}|{text}".encode()).hexdigest()[:32]
    path = cache_dir() / f"{unit}-sm_{arch}-{key}.cubin"
    if path.is_file() and path.stat().st_size > 0:
        return path.read_bytes()
    data = compile_unit(unit, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


# -- loading and launching on a GPU (CUDA driver API through ctypes) ----------------------------------
@functools.cache
def driver() -> ctypes.CDLL:
    """libcuda (the NVIDIA driver's), initialised; an InputError where there is none (no GPU driver)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise InputError("no NVIDIA driver (libcuda.so.1): NVRTC-compiled kernels need a GPU") from None
    _driver_check(lib.cuInit(0), "cuInit")
    return lib


def _driver_check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"CUDA driver {what} failed with error {code}")


class Module:
    """One unit's cubin loaded into the current CUDA context; kernels looked up by their C names."""

    def __init__(self, image: bytes):
        self._image = ctypes.create_string_buffer(image, len(image))  # kept alive while loaded
        self.handle = ctypes.c_void_p()
        _driver_check(driver().cuModuleLoadData(ctypes.byref(self.handle), self._image), "cuModuleLoadData")
        self.functions: dict[str, ctypes.c_void_p] = {}

    def function(self, name: str) -> ctypes.c_void_p:
        if name not in self.functions:
            fn = ctypes.c_void_p()
            _driver_check(driver().cuModuleGetFunction(ctypes.byref(fn), self.handle, name.encode()), name)
            self.functions[name] = fn
        return self.functions[name]


def pack(args) -> tuple[list, ctypes.Array]:
    """Kernel parameters as the driver takes them: an array of pointers to each value. ``args`` are
    ("p", address) | ("i64", int) | ("f32", float); returns (the values, kept alive; the array)."""
    kinds = {"p": ctypes.c_void_p, "i64": ctypes.c_longlong, "f32": ctypes.c_float}
    values = [kinds[kind](value) for kind, value in args]
    return values, (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values))


_MODULES: dict[tuple[str, str, int], Module] = {}


def launch(unit: str, arch: str, context: int, name: str, grid, block: int, args, stream: int) -> int:
    """Run kernel ``name`` of ``unit`` (compiled for ``arch``, loaded once per CUDA context);
    returns the driver's error code (0: launched)."""
    key = (unit, arch, context)
    if key not in _MODULES:
        _MODULES[key] = Module(cubin(unit, arch))
    values, params = pack(args)
    gx, gy = (grid, 1) if isinstance(grid, int) else grid
    code = driver().cuLaunchKernel(
        _MODULES[key].function(name), gx, gy, 1, block, 1, 1, 0, ctypes.c_void_p(stream), params, None
    )
    del values
    return code
