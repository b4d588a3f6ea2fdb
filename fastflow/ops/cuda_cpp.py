"""The CUDA C++ backend: fastflow ops through ``fastflow._C`` (csrc/), a torch-free C-ABI module.

Each function here has its op's reference signature. It checks what the kernel needs (a CUDA
tensor, dtype, layout, 16-byte alignment) and otherwise runs the op's reference, so the backend is
safe to force with ``set_backend("cuda_cpp")`` on any input. Tensors go to the module as
``data_ptr()`` integers with the current stream's handle (so launches join CUDA graphs). The module
is imported on first use; a missing build is a clear error, not an ImportError at import time.
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import InputError
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
    """(built, why) for ``fastflow doctor``."""
    try:
        c = module()
    except InputError as e:
        return False, str(e)
    return True, f"fastflow._C built for sm {c.ARCHS}, CUDA runtime {c.runtime_version()}, {c.device_count()} GPU(s)"


def _run(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"fastflow._C: {module().error_string(code)}")


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
    c = module()
    n, channels, h, w = x.shape
    y = torch.empty_like(x)  # channels-last like x
    w32 = weight.detach().float().contiguous()
    b32 = bias.detach().float().contiguous()
    vec = VECTOR_BYTES // x.element_size()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    splits = groupnorm_splits(n, num_groups, h * w, channels // num_groups // vec, sms)
    workspace = torch.empty(c.groupnorm_silu_workspace_floats(n, num_groups, splits), device=x.device)
    _run(c.groupnorm_silu_nhwc(
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
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    _run(module().fp8_quantize_per_token(
        DTYPE_CODES[x.dtype], x.data_ptr(), q.data_ptr(), scale.data_ptr(), m, k, _stream(x.device)
    ))  # fmt: skip
    return q, scale


def qk_norm_rope(qkv, q_scale, k_scale, cos, sin, num_heads: int, eps: float = 1e-6):
    """q / k RMSNorm + FLUX RoPE of a fused projection by csrc/qk_norm_rope.cu (a warp per token
    and head); the reference for head sizes other than 64 / 128 / 256 or unaligned inputs."""
    b, tokens, width = qkv.shape
    d = width // (3 * num_heads)
    tables = (cos, sin)
    usable = (
        qkv.is_cuda and qkv.dtype in DTYPE_CODES and qkv.is_contiguous() and d in (64, 128, 256) and _aligned(qkv)
        and all(t.is_cuda and t.dtype == torch.float32 and t.is_contiguous() and _aligned(t) for t in tables)
    )  # fmt: skip
    if not usable:
        return qk_norm_rope_ref(qkv, q_scale, k_scale, cos, sin, num_heads, eps)
    q, k, v = (qkv.new_empty(b, num_heads, tokens, d) for _ in range(3))
    qs, ks = (s.detach().float().contiguous() for s in (q_scale, k_scale))
    _run(module().qk_norm_rope(
        DTYPE_CODES[qkv.dtype], qkv.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), qs.data_ptr(),
        ks.data_ptr(), cos.data_ptr(), sin.data_ptr(), b, tokens, num_heads, d, float(eps), _stream(qkv.device),
    ))  # fmt: skip
    return q, k, v
