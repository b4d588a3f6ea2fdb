"""``fastflow doctor``: torch / Triton / GPU versions and which kernel runs each op here."""

from __future__ import annotations

import torch

from .. import __version__
from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="report torch / triton / GPU and which kernels will run")
    p.set_defaults(func=run)


def run(args) -> int:
    import platform

    from .. import ops
    from ..ops.capability import has_fp8_tensor_cores

    print(f"fastflow {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (GPU kernels unavailable; reference ops will run)")
    for line in cpu_section():
        print(line)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            fp8 = (
                "FP8 tensor cores"
                if has_fp8_tensor_cores(f"cuda:{i}")
                else "no FP8 tensor cores: FP8 loads dequantized"
            )
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} sm_{cap[0]}{cap[1]} ({fp8})")
    else:
        print("CUDA: no GPU visible; every op runs its plain-torch reference (FP8 layers dequantize per call)")
    gpu = torch.cuda.is_available()
    from ..ops import cuda_cpp

    built, why = cuda_cpp.status()
    print(f"CUDA C++ kernels: {why}" if built else f"CUDA C++ kernels: not built: {why}")
    if built and gpu:
        cap = torch.cuda.get_device_capability(0)
        try:
            served = cuda_cpp._serves(cuda_cpp.module().ARCHS, cap)
        except InputError:
            served = False
        if not served:
            print(f"  this GPU: NVRTC compiles csrc/ for sm_{cuda_cpp.nvrtc_arch(cap)} at first use (cached)")
    for line in cuda_driver_section(gpu):
        print(line)
    print(f"op backend: {ops.get_backend()} (kernel backends, in order of preference: "
          f"{' > '.join(ops.KERNEL_BACKENDS)}; set_backend('cuda_cpp') forces the CUDA C++ ones)")  # fmt: skip
    for name, opdef in sorted(ops.OPS.items()):
        backend = opdef.device_backend("cuda") if gpu else None
        where = f"{backend} kernel" if backend and gpu else "reference (torch)"
        have = ", ".join(opdef.impls) or "none"
        print(f"  {name:<34} {where:<20} kernels: {have}")
    tuning_section(torch.device("cuda") if gpu else None)
    return 0


def cpu_section() -> list[str]:
    """The CPU's native bfloat16 support and the dtype ``fastflow.load`` picks on it."""
    import os

    from ..ops.capability import cpu_bf16, cpu_default_dtype

    bf16 = cpu_bf16()
    name = platform_processor()
    have = f"native bf16 dot products ({bf16})" if bf16 else "no native bf16 dot products (bf16 would be emulated)"
    dtype = str(cpu_default_dtype()).removeprefix("torch.")
    return [
        f"CPU: {name}, {os.cpu_count()} logical cores, {have}",
        f"  CPU default dtype: {dtype} (fastflow.load / fastflow generate without dtype=, --dtype; a model's "
        "folder may keep float32)",
    ]


def platform_processor() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what platform says."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cuda_driver_section(gpu: bool) -> list[str]:
    """The NVIDIA driver's CUDA version against what the CUDA C++ kernels were built with, and the
    path each GPU's CUDA C++ ops take (fastflow._C, NVRTC, or Triton / the reference with why)."""
    from ..ops import cuda_cpp, cuda_driver

    version = cuda_driver.driver_version()
    if version is None:
        return ["CUDA driver: none found (libcuda.so.1); the CUDA C++ kernels need an NVIDIA GPU"]
    lines = [f"CUDA driver: supports CUDA {cuda_driver.text(version)} (cuDriverGetVersion {version})"]
    try:
        runtime = cuda_cpp.module().runtime_version()
        fits = cuda_driver.runs(runtime, version)
        verdict = "runs on it" if fits else f"needs a driver for CUDA {runtime // 1000}.0 or newer: not used"
        lines.append(f"  fastflow._C: CUDA {cuda_driver.text(runtime)} runtime, {verdict}")
    except InputError:
        pass
    names = {"c": "fastflow._C", "nvrtc": "NVRTC-compiled kernels", "fallback": "Triton kernels / references"}
    for i in range(torch.cuda.device_count() if gpu else 0):
        path, why = cuda_cpp.choice(i)
        lines.append(f"  cuda:{i} CUDA C++ ops run {names[path]}" + (f" ({why})" if why else ""))
    return lines


def tuning_section(device: torch.device | None) -> None:
    """What ``fastflow tune`` measured on this GPU: attention's implementation per head dim /
    dtype, and per op which kernel won against the compiled reference and by how much."""
    from ..ops import attention_backends as ab
    from ..ops import kernel_gate

    print(f"attention default order (untuned): {' > '.join(ab.DEFAULT_ORDER)}; Triton only where tuned")
    if device is None:
        return
    machine = ab.machine_key(device)
    attention = ab.read_table().get(machine, {})
    kernels = kernel_gate.read_table().get(machine, {})
    if not attention and not kernels:
        print(f"tuning: none for {machine}: run `fastflow tune`")
        return
    print(f"tuning for {machine}:")
    for key, e in sorted(attention.items()):
        by = f" ({e['speedup']:.2f}x plain SDPA)" if "speedup" in e else ""
        print(f"  attention {key:<24} {e['backend']}{by}")
    for op, e in sorted(kernels.items()):
        if e["backend"] == "reference":
            lost = "; ".join(f"{b}: {v if isinstance(v, str) else f'{v:.2f}x'}" for b, v in e["candidates"].items())
            print(f"  {op:<34} reference (no kernel won: {lost})")
        else:
            print(f"  {op:<34} {e['backend']} {e['speedup']:.2f}x the compiled reference")
