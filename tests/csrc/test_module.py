"""fastflow._C: built by the install wherever nvcc is on the PATH, importable without a GPU and
without torch, linked against no torch library (and the CUDA runtime statically); skipped
cleanly by FASTFLOW_SKIP_CUDA_BUILD=1 or without nvcc."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_NVCC = shutil.which("nvcc") is not None
SKIPPED = os.environ.get("FASTFLOW_SKIP_CUDA_BUILD", "0") not in ("", "0")


def _built() -> Path | None:
    found = sorted((ROOT / "fastflow").glob("_C.*.so"))
    return found[0] if found else None


def _needed(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(not HAS_NVCC or SKIPPED, reason="no nvcc here (or FASTFLOW_SKIP_CUDA_BUILD): nothing to build")
def test_the_install_built_it_and_it_links_no_torch():
    so = _built()
    assert so is not None, "nvcc is on the PATH but fastflow._C was not built: reinstall (pip install -e .)"
    needed = _needed(so)
    assert not [n for n in needed if any(t in n for t in ("torch", "c10", "cudart", "python"))], needed
    assert set(needed) <= {"libstdc++.so.6", "libgcc_s.so.1", "libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2",
                           "libdl.so.2", "libpthread.so.0", "librt.so.1"}, needed  # fmt: skip


@pytest.mark.skipif(_built() is None, reason="fastflow._C is not built here")
def test_imports_without_torch_or_a_gpu():
    """Loaded on its own in a fresh process where importing torch is impossible: it needs nothing
    from torch; a launch without a GPU returns an error code instead of crashing."""
    code = f"""
import importlib.machinery, importlib.util, sys
sys.modules["torch"] = None  # any import of torch fails
spec = importlib.util.spec_from_file_location("fastflow._C", {str(_built())!r})
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)
assert "torch" not in {{k for k, v in sys.modules.items() if v is not None}}
print(C.ARCHS, C.runtime_version() >= 12000, C.device_count())
print(C.groupnorm_silu_nhwc(2, 0, 0, 0, 0, 1, 64, 64, 8, 1, 1e-6, 0, 0) != 0, C.error_string(-1))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:2] == [os.environ.get("FASTFLOW_CUDA_ARCHS", "80;89;90a"), "True"]
    assert lines[1].startswith("True") and "does not take" in lines[1]


def _wheel(tmp_path, env) -> tuple[zipfile.ZipFile, str]:
    """The wheel pip builds of the checkout, and the build's output (pip -v shows setup.py's)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path)]
    done = subprocess.run([*cmd, str(ROOT)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("fastflow-*.whl")
    return zipfile.ZipFile(wheel), done.stdout + done.stderr


def test_installs_without_nvcc(tmp_path):
    """No nvcc on the PATH: the wheel is the pure-Python package (the ops run Triton / references)."""
    nvcc_dirs = {str(Path(p).parent) for p in (shutil.which("nvcc"),) if p}
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d not in nvcc_dirs)
    wheel, _ = _wheel(tmp_path, {**os.environ, "PATH": path})
    names = wheel.namelist()
    assert "fastflow/ops/cuda_cpp.py" in names and not [n for n in names if "/_C." in n]
    assert {"fastflow/_csrc/ff_common.cuh", "fastflow/_csrc/qk_norm_rope.cuh"} <= set(names)  # for NVRTC


HAS_NINJA = shutil.which("ninja") is not None


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc here")
@pytest.mark.parametrize("ninja", ["1", "0"])
def test_wheel_with_nvcc_holds_the_module(tmp_path, ninja):
    """With nvcc (one architecture, to keep it short): the wheel carries fastflow/_C, torch-free,
    built by ninja where it is on the PATH, else by a thread per nvcc job (FASTFLOW_USE_NINJA=0)."""
    env = {**os.environ, "FASTFLOW_SKIP_CUDA_BUILD": "0", "FASTFLOW_CUDA_ARCHS": "89", "FASTFLOW_USE_NINJA": ninja}
    wheel, log = _wheel(tmp_path, env)
    assert ("building with ninja" in log) == (ninja == "1" and HAS_NINJA)
    assert ("in threads (no ninja)" in log) == (ninja == "0" or not HAS_NINJA)
    (so,) = [n for n in wheel.namelist() if n.startswith("fastflow/_C.") and n.endswith(".so")]
    path = Path(wheel.extract(so, tmp_path / "x"))
    assert not [n for n in _needed(path) if "torch" in n or "c10" in n]


@pytest.mark.skipif(not (HAS_NVCC and HAS_NINJA), reason="needs nvcc and ninja")
def test_ninja_rebuilds_only_what_changed(tmp_path):
    """A second build with nothing changed runs no command, and each kernel's object depends on its
    headers (nvcc's -MD dependencies, read by ninja), so a change to csrc/ff_common.cuh rebuilds it."""
    temp, lib = tmp_path / "temp", tmp_path / "lib"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(temp), "--build-lib", str(lib)]
    env = {**os.environ, "FASTFLOW_SKIP_CUDA_BUILD": "0", "FASTFLOW_CUDA_ARCHS": "89", "FASTFLOW_USE_NINJA": "1"}
    runs = [subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert "link" in runs[0].stderr and "no work to do" in runs[1].stderr
    assert list(lib.rglob("_C.*.so"))
    deps = subprocess.run(["ninja", "-C", str(temp / "csrc"), "-t", "deps"], capture_output=True, text=True).stdout
    objects = [block for block in deps.split("\n\n") if block.strip()]
    assert len(objects) == len(list((ROOT / "csrc").glob("*.cu"))) + 1  # and bindings.cpp
    for unit in ("groupnorm_silu", "fp8_quantize", "qk_norm_rope"):  # the kernels and their shared math
        (block,) = [b for b in objects if b.startswith(str(temp / "csrc" / f"{unit}.o"))]
        assert f"csrc/{unit}.cuh" in block and "csrc/ff_common.cuh" in block
