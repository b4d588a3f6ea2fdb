"""Build script: the fastflow package (its Triton kernels in fastflow/kernels) and the optional CUDA
C++ extension ``fastflow._C``.

``fastflow._C`` is built when nvcc is found and ``FASTFLOW_SKIP_CUDA_BUILD`` is not set; otherwise
the pure-Python package is installed and every op runs its Triton kernel or reference. The module
is C ABI + pybind11 only: csrc/*.cu (kernels and ``extern "C"`` launchers) are compiled by nvcc for
``FASTFLOW_CUDA_ARCHS`` (default ``80;89;90a``, plus PTX of the newest for later GPUs), the
bindings by nvcc's host compiler, and the result is linked with the static CUDA runtime: no torch
header, no libtorch / libc10, so one build works with every torch. Sources compile in parallel
(a thread per file: the few translation units do not need ninja).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
CSRC = HERE / "csrc"
DEFAULT_ARCHS = "80;89;90a"


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("FASTFLOW_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    bad = [a for a in archs if not (a[:-1] if a.endswith("a") else a).isdigit()]
    if bad or not archs:
        sys.exit(f"FASTFLOW_CUDA_ARCHS={os.environ.get('FASTFLOW_CUDA_ARCHS')!r}: use e.g. '80;89;90a'")
    return archs


def _gencode(archs: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(a.rstrip("a"))).rstrip("a")  # PTX: arch-specific 'a' is not portable
    return [*flags, f"-gencode=arch=compute_{newest},code=compute_{newest}"]


class BuildCuda(build_ext):
    """Compiles fastflow._C with nvcc (see the module docstring); other extensions as usual."""

    def build_extension(self, ext):
        if ext.name != "fastflow._C":
            return super().build_extension(ext)
        import pybind11

        nvcc = shutil.which("nvcc")
        archs = cuda_archs()
        tmp = Path(self.build_temp) / "csrc"
        tmp.mkdir(parents=True, exist_ok=True)
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}"]
        jobs = [[nvcc, "-c", *common, *_gencode(archs), str(src), "-o", str(tmp / (src.stem + ".o"))]
                for src in sorted(CSRC.glob("*.cu"))]  # fmt: skip
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        jobs.append([nvcc, "-c", "-x", "c++", *common, *includes, f'-DFF_ARCHS="{";".join(archs)}"',
                     str(CSRC / "bindings.cpp"), "-o", str(tmp / "bindings.o")])  # fmt: skip
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
        for cmd, done in zip(jobs, results, strict=True):
            if done.returncode:
                sys.exit(
                    f"building fastflow._C failed:\n{' '.join(cmd)}\n{done.stderr}\n"
                    "set FASTFLOW_SKIP_CUDA_BUILD=1 to install without the CUDA C++ kernels (Triton and the "
                    "references still run), or FASTFLOW_CUDA_ARCHS to the architectures your nvcc supports"
                )
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", "-cudart", "static", *(str(p) for p in sorted(tmp.glob("*.o"))), "-o", str(out)]
        done = subprocess.run(link, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"linking fastflow._C failed:\n{' '.join(link)}\n{done.stderr}")


def _cuda_extensions():
    if os.environ.get("FASTFLOW_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return []
    if shutil.which("nvcc") is None or not list(CSRC.glob("*.cu")):
        return []
    return [Extension("fastflow._C", sources=[str(p.relative_to(HERE)) for p in sorted(CSRC.glob("*.cu"))])]


setup(
    packages=[*find_packages(include=["fastflow", "fastflow.*"]), "fastflow._csrc"],
    package_dir={"fastflow._csrc": "csrc"},  # the kernel sources, for NVRTC at run time
    package_data={"fastflow": ["assets/**/*"], "fastflow._csrc": ["*.cuh", "*.cu", "*.h", "*.cpp"]},
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": BuildCuda},
)
