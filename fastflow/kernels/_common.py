"""What the kernel modules share: the planned launch, shipped-shape helpers, row-kernel heuristics.

Every module plans its launch as a :class:`Launch` (kernel, grid, arguments, meta-parameters, the
tensors it reads and writes) and runs it; its ``shipped(arch)`` returns the launches planned for
the real FLUX.1 / SD3.5 / VAE shapes on meta tensors. ``tools/kernel_report.py`` compiles exactly
those (with Triton's own run-time argument specialization) and the benches count their bytes, so
no signature, constant or shape is copied by hand.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import triton

from fastflow.errors import InputError

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROW = 65536  # widest row a single-program row kernel holds (FLUX/SD3 rows are at most 21504)


@dataclass
class Launch:
    """One planned kernel launch; calling it runs the kernel (if the grid is not empty) and returns
    the outputs."""

    kernel: object  # a @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    meta: dict  # constexpr meta-parameters and launch options (num_warps, num_stages)
    outputs: object
    reads: tuple = field(default_factory=tuple)  # tensors read, once per pass the kernel makes over them
    writes: tuple = field(default_factory=tuple)

    def __call__(self):
        if all(self.grid):
            # from the tensors it writes / reads: host tensor descriptors among the args are not tensors
            tensors = (*self.writes, *self.reads, *self.args)
            device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
            if device is not None and device.type == "cuda":
                with torch.cuda.device(device):  # Triton launches on the current device, not the tensors'
                    self.kernel[self.grid](*self.args, **self.meta)
            else:
                self.kernel[self.grid](*self.args, **self.meta)
        return self.outputs

    @property
    def bytes_moved(self) -> int:
        """Bytes the kernel moves: every read (a tensor read in k passes is listed k times) and write."""
        return sum(t.numel() * t.element_size() for t in (*self.reads, *self.writes))


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    # called inside the launch, under Launch's device guard: "cuda" is the tensors' device
    return torch.empty(size, dtype=torch.int8, device="cuda")


# Triton keeps its allocator in a ContextVar: every thread (a server's worker pool) and every context
# copied before the allocator was set starts with Triton's null allocator ("no allocator was set").
# The flag is a ContextVar too, set next to Triton's, so the two are seen or unseen together: the
# first launch in a new thread or context sets the allocator again; later ones pay one lookup.
_ALLOCATOR_SET: ContextVar[bool] = ContextVar("fastflow_triton_allocator_set", default=False)


def ensure_allocator(device: torch.device) -> None:
    """Device-side tensor descriptors need global scratch memory for the TMA descriptors."""
    if device.type == "cuda" and not _ALLOCATOR_SET.get():
        triton.set_allocator(_scratch)
        _ALLOCATOR_SET.set(True)


def specialize(launch: Launch, arch: int):
    """(signature, constexprs, attrs, options) exactly as the Triton runtime derives them from the
    launch's arguments on ``arch`` (e.g. 90), through Triton's own binder: no driver or GPU needed.
    Integers become i32 / i64, ``== 1`` a constant and multiples of 16 get the divisibility
    attribute, as at run time; pointers of meta tensors count as 16-byte aligned."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, options)
    return signature, constexprs, attrs, options


def arch_family(arch: int) -> int:
    """Which row of a kernel's config table a GPU uses, from its compute capability (e.g. 90):
    9 for sm_90, 10 for sm_100 (both 227 KB of shared memory per block; tcgen05 on sm_100 needs its
    own tiles where registers run out), 8 for sm_80 / 86 / 89, for the consumer Blackwell sm_120
    (99 KB, like sm_89) and for anything unknown (the smaller tiles)."""
    return {9: 9, 10: 10}.get(arch // 10, 8)


def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def meta(*shape: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A tensor without storage, for planning launches at full-size shapes."""
    return torch.empty(shape, dtype=dtype, device="meta")


def short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def per_sample(vec: torch.Tensor, b: int, c: int, what: str) -> torch.Tensor:
    """A modulation vector as the row kernels index it (contiguous [B, C], row b at b * C): one
    shared by the batch ([1, C], as the references broadcast it) is expanded, other shapes refused
    (a kernel would read out of bounds where the reference raises)."""
    if vec.dim() != 2 or vec.shape[1] != c or vec.shape[0] not in (1, b):
        raise InputError(f"{what} must have shape [{b}, {c}] or [1, {c}], got {list(vec.shape)}")
    return vec.expand(b, c).contiguous()


def row_block(n: int) -> int:
    """Block covering a whole row of n elements."""
    if n > MAX_ROW:
        raise InputError(
            f"rows of {n} elements are wider than the row kernels' limit of {MAX_ROW}; "
            'use fastflow.ops.set_backend("reference") for this model'
        )
    return max(16, triton.next_power_of_2(n))


def row_warps(block: int) -> int:
    """Warps for a row block: about 8 elements per thread for wide rows, at least one warp."""
    return max(1, min(16, block // 256))


# Token rows x widths of the row ops at 1024x1024: FLUX.1 (4096 image + 512 text tokens, 3072),
# SD3.5-large (4096 + 333 tokens, 2432), SD3.5-medium (1536).
ROW_SHAPES = {
    "flux img": (4096, 3072),
    "flux txt": (512, 3072),
    "sd3.5-large": (4429, 2432),
    "sd3.5-medium": (4429, 1536),
}
