"""The CUDA C++ backend: fastflow ops through ``fastflow._C`` (csrc/), a torch-free C-ABI module.

Each function here has its op's reference signature. It checks what the kernel needs (a CUDA
tensor, dtype, layout, 16-byte alignment) and otherwise runs the op's reference, so the backend is
safe to force with ``set_backend("cuda_cpp")`` on any input. Tensors go to the kernels as
``data_ptr()`` integers with the current stream's handle (so launches join CUDA graphs). The
kernels come from the built ``fastflow._C`` where it serves the GPU (its cubins, or its PTX for
newer GPUs), else from NVRTC at run time (:class:`NvrtcKernels`); neither is imported before use.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from ..errors import InputError
from . import cuda_driver
from .reference import fp8_quantize_ref, groupnorm_silu_ref, qk_norm_rope_ref

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VECTOR_BYTES = 16  # the kernels' loads and stores


@functools.cache
def module():
    """``fastflow._C``, or an InputError saying how to build it."""
    try:
        from .. import _C
    except ImportError as e:
        raise InputError(
            f"the CUDA C++ kernels are not built ({e}): reinstall with nvcc on the PATH "
            "(pip install -e . builds fastflow._C; FASTFLOW_CUDA_ARCHS picks the GPUs), or use the Triton backend"
        ) from None
    return _C


def status() -> tuple[bool, str]:
    """(usable, how) for ``fastflow doctor``: the built module, or NVRTC at run time, or neither."""
    from . import nvrtc

    try:
        major, minor = nvrtc.version()
        compiler = f"NVRTC {major}.{minor}"
    except InputError:
        compiler = None  # no cuda-python or no libnvrtc
    try:
        c = module()
    except InputError as e:
        if compiler is None:
            return False, f"{e}; NVRTC is not installed either ({nvrtc.INSTALL})"
        return True, f"fastflow._C is not built; {compiler} compiles csrc/ for the GPU at first use"
    fallback = f"{compiler} for other GPUs" if compiler else f"no NVRTC for other GPUs ({nvrtc.INSTALL})"
    built = f"fastflow._C built for sm {c.ARCHS}, CUDA runtime {c.runtime_version()}, {c.device_count()} GPU(s)"
    return True, f"{built}; {fallback}"


def _serves(archs: str, cap: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` ("80;89;90a") runs on a GPU of capability ``cap``."""
    return _served_by(archs, cap) is not None


def _served_by(archs: str, cap: tuple[int, int]) -> str | None:
    """How a build for ``archs`` runs on a GPU of capability ``cap``: "cubin" (one of the same major
    version and no newer minor; an 'a' cubin only on its own architecture), "ptx" (the PTX of the
    newest architecture, which the driver compiles for any newer GPU), or None."""
    value, built = cap[0] * 10 + cap[1], [a for a in archs.split(";") if a]
    for arch in built:
        number = int(arch.rstrip("a"))
        if number == value or (not arch.endswith("a") and number // 10 == cap[0] and number <= value):
            return "cubin"
    return "ptx" if built and value >= max(int(a.rstrip("a")) for a in built) else None


def nvrtc_arch(cap: tuple[int, int]) -> str:
    """NVRTC's target for a GPU: the arch-specific 'a' targets of sm_90 / sm_100, plain otherwise."""
    arch = f"{cap[0]}{cap[1]}"
    return arch + "a" if arch in ("90", "100") else arch


class NvrtcKernels:
    """fastflow._C's functions run from NVRTC-compiled cubins (fastflow.ops.nvrtc): the same kernels
    with the launch shapes of csrc/*.cu's launchers, for GPUs the built module does not serve or
    installs without it. Return codes as the C ABI's: 0 launched, -1 a bad argument, else the driver's."""

    def __init__(self, arch: str, device: int):
        self.arch, self.device = arch, device  # the GPU whose primary context loads and launches

    def _go(self, unit: str, name: str, grid, args, stream: int) -> int:
        from . import nvrtc

        return nvrtc.launch(unit, self.arch, self.device, name, grid, 256, args, stream)

    @staticmethod
    def error_string(code: int) -> str:
        return "a size, dtype or layout the CUDA C++ kernel does not take" if code == -1 else f"driver error {code}"

    @staticmethod
    def groupnorm_silu_workspace_floats(n: int, groups: int, splits: int) -> int:
        return n * groups * (splits * 3 + 2)

    def groupnorm_silu_nhwc(self, dtype, x, y, weight, bias, n, hw, c, groups, splits, eps, workspace, stream):
        vec = 4 if dtype == 0 else 8
        if min(n, hw, c, groups, splits) <= 0 or c % groups or (c // groups) % vec:
            return -1
        suffix, partial = _SUFFIX[dtype], workspace
        stats = workspace + n * groups * splits * 3 * 4  # bytes: after the partials
        vectors = hw * c // vec
        code = self._go(
            "groupnorm_silu",
            f"ff_groupnorm_stats_{suffix}",
            (splits, n * groups),
            [("p", x), ("p", partial), ("i64", hw), ("i64", c), ("i64", groups), ("i64", splits)],
            stream,
        )
        code = code or self._go(
            "groupnorm_silu",
            "ff_groupnorm_finalize",
            (n * groups + 255) // 256,
            [("p", partial), ("p", stats), ("i64", n * groups), ("i64", splits), ("f32", eps)],
            stream,
        )
        return code or self._go(
            "groupnorm_silu", f"ff_groupnorm_apply_{suffix}", (min((vectors + 255) // 256, 65535), n),
            [("p", x), ("p", y), ("p", weight), ("p", bias), ("p", stats), ("i64", hw), ("i64", c), ("i64", groups)],
            stream,
        )  # fmt: skip

    def fp8_quantize_per_token(self, dtype, x, q, scale, m, k, stream):
        if m <= 0 or k <= 0 or k % (4 if dtype == 0 else 8):
            return -1
        args = [("p", x), ("p", q), ("p", scale), ("i64", k)]
        return self._go("fp8_quantize", f"ff_fp8_quantize_per_token_{_SUFFIX[dtype]}", m, args, stream)

    def qk_norm_rope(self, dtype, qkv, q, k, v, q_scale, k_scale, cos, sin, batch, tokens, heads, head_dim, eps,
                     stream):  # fmt: skip
        if min(batch, tokens, heads) <= 0 or head_dim not in (64, 128, 256):
            return -1
        name = f"ff_qk_norm_rope_{_SUFFIX[dtype]}_d{head_dim // 32}"
        args = [("p", a) for a in (qkv, q, k, v, q_scale, k_scale, cos, sin)]
        args += [("i64", batch), ("i64", tokens), ("i64", heads), ("f32", eps)]
        return self._go("qk_norm_rope", name, ((batch * tokens * heads * 32 + 255) // 256, 3), args, stream)


_SUFFIX = {0: "f32", 1: "f16", 2: "bf16"}
_KERNELS: dict[int, object] = {}
_warned: list[str] = []  # the driver warning, given once per process


def _nvrtc_version() -> tuple[int, int] | None:
    from . import nvrtc

    try:
        return nvrtc.version()
    except InputError:
        return None


def choice(index: int) -> tuple[str, str]:
    """cuda_driver.choose for GPU ``index``: which CUDA C++ path its driver runs, and why not the
    built module where it cannot."""
    cap = torch.cuda.get_device_capability(index)
    try:
        c = module()
        built, served = (c.runtime_version(), c.ARCHS), _served_by(c.ARCHS, cap)
    except InputError:
        built, served = None, None
    return cuda_driver.choose(cuda_driver.driver_version(), built, served, _nvrtc_version())


def kernels(device: torch.device):
    """What runs the CUDA C++ kernels on ``device``: fastflow._C where it serves the GPU and its
    driver, else NvrtcKernels compiled for it, else None (the driver runs neither: one warning, and
    the ops run their Triton kernels or references). An InputError when neither is installed."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _KERNELS:
        path, why = choice(index)
        if path == "c":
            _KERNELS[index] = module()
        elif path == "nvrtc":
            _KERNELS[index] = NvrtcKernels(nvrtc_arch(torch.cuda.get_device_capability(index)), index)
        elif not why:
            from . import nvrtc

            nvrtc.library()  # neither is installed: an InputError saying what to install
            raise InputError(f"NVRTC is not usable here: {nvrtc.INSTALL}")
        else:
            _KERNELS[index] = None
        if why and not _warned:
            _warned.append(why)
            warnings.warn(why, stacklevel=3)
    return _KERNELS[index]


def _fallback(name: str, args: tuple):
    """Op ``name`` on ``args`` without the CUDA C++ kernels (the driver runs neither fastflow._C
    nor NVRTC's): its Triton kernel where installed, else its reference."""
    from ._registry import OPS, _available

    opdef = OPS[name]
    return opdef.run("triton", args) if "triton" in opdef.impls and _available("triton") else opdef.reference(*args)


def _run(k, code: int) -> None:
    if code != 0:
        raise RuntimeError(f"fastflow CUDA C++ kernel: {k.error_string(code)}")


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.data_ptr() % VECTOR_BYTES == 0 for t in tensors)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def groupnorm_splits(images: int, groups: int, pixels: int, per_pixel_vectors: int, sms: int = 132) -> int:
    """Spatial splits of the statistics pass: enough blocks to fill the GPU (4 per SM) but at least
    four 128-bit loads per thread per split (256 threads)."""
    want = math.ceil(4 * sms / (images * groups))
    most = max(1, pixels * per_pixel_vectors // (256 * 4))
    return max(1, min(want, most, 65535))


def groupnorm_silu_supported(x: torch.Tensor, num_groups: int) -> bool:
    """The NHWC kernel's inputs: a 4-D channels-last CUDA tensor, fp32 / fp16 / bf16, C / G a
    multiple of the vector width, 16-byte aligned."""
    if not (x.is_cuda and x.dim() == 4 and x.dtype in DTYPE_CODES):
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or x.shape[1] % num_groups:
        return False
    vec = VECTOR_BYTES // x.element_size()
    return (x.shape[1] // num_groups) % vec == 0 and _aligned(x)


def groupnorm_silu(x, weight, bias, num_groups: int = 32, eps: float = 1e-6):
    """SiLU(GroupNorm(x)) by csrc/groupnorm_silu.cu for channels-last x; the reference otherwise."""
    if not groupnorm_silu_supported(x, num_groups):
        return groupnorm_silu_ref(x, weight, bias, num_groups, eps)
    with torch.cuda.device(x.device):  # the launch, workspace and stream on x's GPU
        c = kernels(x.device)
        if c is None:
            return _fallback("groupnorm_silu", (x, weight, bias, num_groups, eps))
        n, channels, h, w = x.shape
        y = torch.empty_like(x)  # channels-last like x
        w32 = weight.detach().to(x.device, torch.float32).contiguous()
        b32 = bias.detach().to(x.device, torch.float32).contiguous()
        vec = VECTOR_BYTES // x.element_size()
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = groupnorm_splits(n, num_groups, h * w, channels // num_groups // vec, sms)
        workspace = torch.empty(c.groupnorm_silu_workspace_floats(n, num_groups, splits), device=x.device)
        _run(c, c.groupnorm_silu_nhwc(
            DTYPE_CODES[x.dtype], x.data_ptr(), y.data_ptr(), w32.data_ptr(), b32.data_ptr(), n, h * w, channels,
            num_groups, splits, float(eps), workspace.data_ptr(), _stream(x.device),
        ))  # fmt: skip
    return y


def fp8_quantize(x, static_scale=None, per_token: bool = True):
    """Per-token e4m3 quantization by csrc/fp8_quantize.cu (amax, scale and cast in one kernel); the
    reference for a static scale, a per-tensor scale or inputs the kernel does not take."""
    vec = VECTOR_BYTES // x.element_size() if x.dtype in DTYPE_CODES else 0
    usable = x.is_cuda and x.dtype in DTYPE_CODES and x.dim() == 2 and x.is_contiguous() and _aligned(x)
    if static_scale is not None or not per_token or not usable or x.shape[1] % vec or x.shape[0] == 0:
        return fp8_quantize_ref(x, static_scale, per_token)
    m, k = x.shape
    with torch.cuda.device(x.device):
        c = kernels(x.device)
        if c is None:
            return _fallback("fp8_quantize", (x, static_scale, per_token))
        q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty(m, device=x.device, dtype=torch.float32)
        _run(c, c.fp8_quantize_per_token(
            DTYPE_CODES[x.dtype], x.data_ptr(), q.data_ptr(), scale.data_ptr(), m, k, _stream(x.device)
        ))  # fmt: skip
    return q, scale


def _on(device: torch.device, t: torch.Tensor | None, numel: int) -> bool:
    """An optional fp32-able side input the kernel can read: None, or ``numel`` values on ``device``."""
    return t is None or (t.device == device and t.numel() == numel)


def _vector_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous fp32 at a 16-byte aligned address (the kernel reads it in vectors)."""
    t = t.detach().float().contiguous()
    return t if _aligned(t) else t.clone()


def qk_norm_rope(qkv, q_scale, k_scale, cos, sin, num_heads: int, eps: float = 1e-6):
    """q / k RMSNorm + FLUX RoPE of a fused projection by csrc/qk_norm_rope.cu (a warp per token
    and head); as the reference, a None scale skips that norm and None tables skip RoPE (the kernel
    takes null pointers). The reference for head sizes other than 64 / 128 / 256, unaligned inputs,
    one scale without the other or side inputs on another device; an InputError for one RoPE table
    without the other, before any launch."""
    if (cos is None) != (sin is None):
        raise InputError("qk_norm_rope: pass both RoPE tables (cos and sin) or neither")
    b, tokens, width = qkv.shape
    d = width // (3 * num_heads)
    tables = () if cos is None else (cos, sin)
    usable = (
        qkv.is_cuda and qkv.dtype in DTYPE_CODES and qkv.is_contiguous() and d in (64, 128, 256) and _aligned(qkv)
        and all(t.dtype == torch.float32 and t.is_contiguous() and _aligned(t) for t in tables)
        and all(_on(qkv.device, t, tokens * d // 2) for t in tables)
        and (q_scale is None) == (k_scale is None) and _on(qkv.device, q_scale, d) and _on(qkv.device, k_scale, d)
    )  # fmt: skip
    if not usable:
        return qk_norm_rope_ref(qkv, q_scale, k_scale, cos, sin, num_heads, eps)
    with torch.cuda.device(qkv.device):
        c = kernels(qkv.device)
        if c is None:
            return _fallback("qk_norm_rope", (qkv, q_scale, k_scale, cos, sin, num_heads, eps))
        q, k, v = (qkv.new_empty(b, num_heads, tokens, d) for _ in range(3))
        qs, ks = (None if s is None else _vector_ready(s) for s in (q_scale, k_scale))
        qs_p, ks_p, cos_p, sin_p = (0 if t is None else t.data_ptr() for t in (qs, ks, cos, sin))  # 0: null
        _run(c, c.qk_norm_rope(
            DTYPE_CODES[qkv.dtype], qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), qs_p, ks_p, cos_p,
            sin_p, b, tokens, num_heads, d, float(eps), _stream(qkv.device),
        ))  # fmt: skip
    return q, k, v
