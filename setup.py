"""Build script: the fastflow package (its Triton kernels in fastflow/kernels) and the optional CUDA
C++ extension ``fastflow._C``.

``fastflow._C`` is built when nvcc is found and ``FASTFLOW_SKIP_CUDA_BUILD`` is not set; otherwise
the pure-Python package is installed and every op runs its Triton kernel or reference. The module
is C ABI + pybind11 only: csrc/*.cu (kernels and ``extern "C"`` launchers) are compiled by nvcc for
``FASTFLOW_CUDA_ARCHS`` (default ``80;89;90a``, plus PTX of the newest for later GPUs), the
bindings by nvcc's host compiler, and the result is linked with the static CUDA runtime: no torch
header, no libtorch / libc10, so one build works with every torch. Sources compile in parallel:
with ninja where it is on the PATH (a build.ninja in the build directory, with nvcc's header
dependencies, so a rebuild compiles only what changed; ``FASTFLOW_USE_NINJA=0`` turns it off),
else a thread per file.

Which toolkit: ``$CUDA_HOME/bin/nvcc`` where ``CUDA_HOME`` (or ``CUDA_PATH``) is set, else the nvcc on
the PATH. The static runtime is that toolkit's, and it decides the drivers the module runs on: a
CUDA 12.x build on every driver from R525 (12.0) on, a CUDA 13.x build from R580 on only. On an
older driver fastflow falls back at run time (NVRTC of the driver's major, else Triton, else the
reference: fastflow.ops.cuda_driver), so for H100 clouds on R535-R570 build with a 12.x toolkit,
e.g. ``CUDA_HOME=/usr/local/cuda-12.8 pip install -e .``, or install ``fastflow[cuda12]``. PyPI has
no 12.x nvcc to build with: its nvidia-cuda-nvcc-cu12 wheels hold ptxas, libnvvm and headers, but
not nvcc, cudafe++ or fatbinary, and nvidia-cuda-runtime-cu12 has no static runtime.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
DEFAULT_ARCHS = "80;89;90a"


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``'s) where set, else the nvcc on the PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            if nvcc.is_file():
                return str(nvcc)
            print(f"fastflow._C: {var}={home!r} has no bin/nvcc; using the PATH's nvcc", file=sys.stderr)
    return shutil.which("nvcc")


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

        nvcc = find_nvcc()
        archs = cuda_archs()
        tmp = Path(self.build_temp).resolve() / "csrc"
        tmp.mkdir(parents=True, exist_ok=True)
        common = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC}"]
        jobs = [[nvcc, "-c", *common, *_gencode(archs), str(src), "-o", str(tmp / (src.stem + ".o"))]
                for src in sorted(CSRC.glob("*.cu"))]  # fmt: skip
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        jobs.append([nvcc, "-c", "-x", "c++", *common, *includes, f'-DFF_ARCHS="{";".join(archs)}"',
                     str(CSRC / "bindings.cpp"), "-o", str(tmp / "bindings.o")])  # fmt: skip
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        objects = [Path(cmd[-1]) for cmd in jobs]
        link = [nvcc, "-shared", "-cudart", "static", *map(str, objects), "-o", str(out)]
        ninja = shutil.which("ninja") if os.environ.get("FASTFLOW_USE_NINJA", "1") not in ("", "0") else None
        if ninja:
            _ninja_build(ninja, tmp, jobs, link)
        else:
            _thread_build(jobs, link)


HINT = (
    "set FASTFLOW_SKIP_CUDA_BUILD=1 to install without the CUDA C++ kernels (Triton and the references "
    "still run), or FASTFLOW_CUDA_ARCHS to the architectures your nvcc supports"
)


def _thread_build(jobs: list[list[str]], link: list[str]) -> None:
    print(f"fastflow._C: {len(jobs)} nvcc jobs in threads (no ninja)", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
    for cmd, done in zip(jobs, results, strict=True):
        if done.returncode:
            sys.exit(f"building fastflow._C failed:\n{shlex.join(cmd)}\n{done.stderr}\n{HINT}")
    done = subprocess.run(link, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"linking fastflow._C failed:\n{shlex.join(link)}\n{done.stderr}")


def _ninja_build(ninja: str, tmp: Path, jobs: list[list[str]], link: list[str]) -> None:
    """The same commands as a build.ninja: nvcc writes each object's header dependencies (-MD), and
    ninja reruns a command when its inputs or its command line changed."""

    def esc(text: str) -> str:  # ninja's escapes for paths in build lines
        return text.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    lines = [
        "ninja_required_version = 1.3",
        "rule nvcc",
        "  command = $cmd",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",
        "  command = $cmd",
        "  description = link $out",
    ]
    for cmd in jobs:
        obj, src = cmd[-1], cmd[-3]
        full = [*cmd[:-2], "-MD", "-MF", f"{obj}.d", *cmd[-2:]]
        lines += [f"build {esc(obj)}: nvcc {esc(src)}", f"  cmd = {shlex.join(full).replace('$', '$$')}"]
    lines += [f"build {esc(link[-1])}: link {' '.join(esc(c[-1]) for c in jobs)}",
              f"  cmd = {shlex.join(link).replace('$', '$$')}"]  # fmt: skip
    (tmp / "build.ninja").write_text("\n".join(lines) + "\n")
    print(f"fastflow._C: building with ninja ({tmp / 'build.ninja'})", file=sys.stderr)
    done = subprocess.run([ninja, "-C", str(tmp), "-j", str(os.cpu_count() or 2)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"building fastflow._C failed (ninja):\n{done.stdout}\n{done.stderr}\n{HINT}")
    print(f"fastflow._C: {done.stdout.strip().splitlines()[-1]}", file=sys.stderr)  # "no work to do" on a rerun


def _cuda_extensions():
    if os.environ.get("FASTFLOW_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return []
    if find_nvcc() is None or not list(CSRC.glob("*.cu")):
        return []
    return [Extension("fastflow._C", sources=[str(p.relative_to(HERE)) for p in sorted(CSRC.glob("*.cu"))])]


setup(
    packages=[*find_packages(include=["fastflow", "fastflow.*"]), "fastflow._csrc"],
    package_dir={"fastflow._csrc": "csrc"},  # the kernel sources, for NVRTC at run time
    package_data={"fastflow": ["assets/**/*"], "fastflow._csrc": ["*.cuh", "*.cu", "*.h", "*.cpp"]},
    ext_modules=_cuda_extensions(),
    cmdclass={"build_ext": BuildCuda},
)
