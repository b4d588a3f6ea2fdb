"""Which CUDA C++ path the installed NVIDIA driver can run, decided once per GPU at first use.

``fastflow._C`` links the CUDA runtime it was built with statically, and a runtime of major X needs a
driver of major X or newer (CUDA's minor version compatibility: a 12.8 runtime runs on a 12.2 driver,
a 13.0 runtime on no 12.x driver), and the same minor too where the GPU has no cubin in the build and
the driver must compile the module's PTX. NVRTC-compiled cubins follow the same rule with NVRTC's
version. :func:`choose` applies it: ``fastflow._C`` where the driver runs it, else NVRTC where
installed and runnable, else ``fallback`` (the op's Triton kernel, else its reference), with the
reason for the single warning and for ``fastflow doctor``.
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def driver_version() -> int | None:
    """The driver's CUDA version as ``cuDriverGetVersion`` gives it (12020 for 12.2, R535), read
    from libcuda without initialising a GPU; None where there is no NVIDIA driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(value)) != 0:
        return None
    return value.value


def text(version: int) -> str:
    """12020 -> '12.2'."""
    return f"{version // 1000}.{version % 1000 // 10}"


def runs(built: int, driver: int | None, jit: bool = False) -> bool:
    """Whether code from CUDA ``built`` (a runtime or NVRTC version, 12080) runs on ``driver``: the
    same major or newer, and no older a version at all where the driver JIT-compiles PTX
    (``jit``). An unknown driver (None) is given the benefit of the doubt."""
    if driver is None:
        return True
    return driver >= built if jit else driver // 1000 >= built // 1000


def nvrtc_install(driver: int) -> str:
    """The pip command for NVRTC of a driver's CUDA major (the cuda-python bindings of that major
    load it)."""
    major = driver // 1000
    if major == 12:
        return 'pip install "fastflow[cuda12]"'
    return f'pip install "cuda-bindings=={major}.*" "nvidia-cuda-nvrtc=={major}.*"'


def choose(
    driver: int | None,
    built: tuple[int, str] | None,
    served: str | None,
    nvrtc: tuple[int, int] | None,
) -> tuple[str, str]:
    """("c" | "nvrtc" | "fallback", why) for one GPU. ``built``: fastflow._C's (runtime version,
    archs), None when it is not built; ``served``: how the build serves this GPU ("cubin", "ptx" or
    None); ``nvrtc``: NVRTC's (major, minor), None when it is not installed. ``why`` is empty when
    nothing is wrong with the driver (the build lacks this GPU, or is not installed)."""
    why = ""
    if built is not None and served is not None:
        runtime = built[0]
        if runs(runtime, driver, jit=served == "ptx"):
            return "c", ""
        need = text(runtime) if served == "ptx" else f"{runtime // 1000}.0"
        why = (
            f"fastflow._C is built with the CUDA {text(runtime)} runtime and needs a driver for CUDA {need} "
            f"or newer; this driver supports CUDA {text(driver)}"
        )
    if nvrtc is not None:
        if runs(nvrtc[0] * 1000 + nvrtc[1] * 10, driver):
            return "nvrtc", f"{why}: running NVRTC {nvrtc[0]}.{nvrtc[1]}'s kernels instead" if why else ""
        why = (why + "; " if why else "") + (
            f"NVRTC {nvrtc[0]}.{nvrtc[1]} needs a driver for CUDA {nvrtc[0]}.0 or newer "
            f"(install NVRTC of the driver's major: {nvrtc_install(driver)})"
        )
    if not why:  # neither path is installed: the caller says what to install
        return "fallback", ""
    if nvrtc is None and driver is not None:
        why += f" (NVRTC of the driver's major runs them: {nvrtc_install(driver)})"
    return "fallback", f"{why}: the CUDA C++ ops run their Triton kernels (else the references) instead"
