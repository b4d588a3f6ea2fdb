"""Which implementation runs ``fastflow::attention`` on a GPU: measured there, never assumed.

Candidates, each used only where it can run the call (library installed, GPU, dtype, head dim,
alignment):

* ``fa3``: FlashAttention-3 (``flash_attn_interface``, sm_90);
* ``cudnn``, ``flash``: torch SDPA restricted to its cuDNN or flash backend;
* ``triton``, ``triton-persistent``: fastflow's kernel (fastflow/kernels/attention.py), tiled or persistent;
* ``sdpa``: torch SDPA with its own choice (also the answer for anything the others cannot run).

``fastflow tune`` times every candidate on the user's GPU at the real model shapes, checks each
against the reference (a wrong or failing candidate never wins) and stores the fastest per
(head dim, dtype), with its speedup over plain ``sdpa``, in ``attention.json`` of fastflow's cache
root (:mod:`.tune_table`), keyed by GPU name and torch / Triton / fastflow versions.

Without a table for this GPU and software the safe default order applies: ``fa3`` (where
installed, sm_90), then ``cudnn``, ``flash`` and plain ``sdpa`` (:data:`DEFAULT_ORDER`): libraries
measured on silicon by their makers. fastflow's Triton kernel (tiled or persistent) is never a
default: it runs only where ``fastflow tune`` checked and timed it on this GPU and it won.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from . import cache_root, tune_table
from .reference import attention_layout, attention_ref

_log = logging.getLogger(__name__)
DEFAULT_ORDER = ("fa3", "cudnn", "flash", "sdpa")  # never "triton*": only a tuned table picks it


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool]
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]


@functools.cache
def _fa3():
    try:
        import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def _half(q, k, v) -> bool:
    return q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype


def _fa3_available(q, k, v) -> bool:
    return (
        q.is_cuda
        and _fa3() is not None
        and torch.cuda.get_device_capability(q.device) == (9, 0)
        and _half(q, k, v)
        and q.shape[-1] in (64, 128, 256)
        and all(t.stride(-1) == 1 for t in (q, k, v))
    )


def _fa3_run(q, k, v, scale):
    out = _fa3().flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
    return attention_layout(out.transpose(1, 2))  # FA3 writes [B, L, H, D]: already our layout


def _sdpa_with(which: str):
    def run(q, k, v, scale):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, which)):
            return attention_layout(F.scaled_dot_product_attention(q, k, v, scale=scale))

    return run


def _cuda_half(q, k, v) -> bool:
    return q.is_cuda and _half(q, k, v)


def _triton_available(persistent: bool):
    def available(q, k, v) -> bool:
        try:
            from fastflow.kernels import attention as kernel
        except ImportError:
            return False
        if not (kernel.supported(q) and k.dtype == v.dtype == q.dtype and q.numel() and k.numel()):
            return False
        if not all(kernel.tma_ready(t) for t in (q, k, v)):
            _log.debug("attention: inputs not 16-byte aligned for the Triton kernel")
            return False
        if persistent:
            return q.is_cuda and kernel.persistent_ok(kernel.device_arch(q.device))
        return True

    return available


def _triton_run(persistent: bool):
    def run(q, k, v, scale):
        from fastflow.kernels.attention import attention_fwd

        return attention_fwd(q, k, v, scale, persistent=persistent)

    return run


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa3", _fa3_available, _fa3_run),
        Backend("cudnn", _cuda_half, _sdpa_with("CUDNN_ATTENTION")),
        Backend("flash", _cuda_half, _sdpa_with("FLASH_ATTENTION")),
        Backend("triton", _triton_available(False), _triton_run(False)),
        Backend("triton-persistent", _triton_available(True), _triton_run(True)),
        Backend("sdpa", lambda q, k, v: True, attention_ref),
    )
}


# -- the tuned table -------------------------------------------------------------------------------
TABLE = "attention.json"
MAX_TABLE_BYTES = tune_table.MAX_TABLE_BYTES
MAX_TABLE_DEPTH = 3  # {machine: {"64/bfloat16": {"backend": ..., "ms": ..., "speedup": ...}}}
machine_key = tune_table.machine_key


def cache_dir() -> Path:
    """fastflow's cache root (:mod:`fastflow.ops.cache_root`: ``$FASTFLOW_CACHE_DIR``, absolute)."""
    return cache_root.root()


def table_path() -> Path:
    return cache_dir() / TABLE


def _valid_table(data) -> bool:
    """{machine: {"<head dim>/<dtype>": {"backend": name, "ms": number[, "speedup": number]}}} only."""

    def entry(e) -> bool:
        return (
            isinstance(e, dict)
            and {"backend", "ms"} <= set(e) <= {"backend", "ms", "speedup"}
            and isinstance(e["backend"], str)
            and all(tune_table.finite_number(e[k]) for k in ("ms", "speedup") if k in e)
        )

    return isinstance(data, dict) and all(
        isinstance(m, str) and isinstance(t, dict) and all(isinstance(k, str) and entry(e) for k, e in t.items())
        for m, t in data.items()
    )


def read_table(path: Path | None = None, strict: bool = False) -> dict:
    """The tuned table; {} where there is none or it cannot be used (:func:`tune_table.read`:
    ignored with a warning, never raised inside an attention call; ``strict`` raises
    :class:`UnsafeCacheError` for a cache folder that is not safely the user's own)."""
    shape = "{GPU: {head dim/dtype: {backend, ms, speedup}}}"
    return tune_table.read(path or table_path(), MAX_TABLE_DEPTH, _valid_table, shape, "attention", strict)


def entry_key(head_dim: int, dtype: torch.dtype) -> str:
    return f"{head_dim}/{str(dtype).removeprefix('torch.')}"


@functools.cache
def _table() -> dict:
    return read_table()  # read (and warned about) once, until forget()


def _tuned(machine: str, key: str) -> str | None:
    return _table().get(machine, {}).get(key, {}).get("backend")


def forget() -> None:
    """Drop the in-memory copy of the table (after ``tune`` rewrote it)."""
    _table.cache_clear()


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Backend:
    """The tuned backend for this GPU / head dim / dtype if it can run the call, else the first
    of DEFAULT_ORDER that can. Under ``use_backend("triton")`` (A/B runs, the interpreter tests)
    fastflow's kernel where it can run the call: the caller asked for it by name."""
    from ._registry import get_backend

    if get_backend() == "triton" and BACKENDS["triton"].available(q, k, v):
        return BACKENDS["triton"]
    name = _tuned(machine_key(q.device), entry_key(q.shape[-1], q.dtype))
    if name in BACKENDS and BACKENDS[name].available(q, k, v):
        return BACKENDS[name]
    if name is not None:
        _log.debug("attention: tuned backend %s cannot run this call; using the default order", name)
    return next(BACKENDS[n] for n in DEFAULT_ORDER if n in BACKENDS and BACKENDS[n].available(q, k, v))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    return choose(q, k, v).run(q, k, v, scale)


# -- tuning --------------------------------------------------------------------------------------------
def _default_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def tune(
    device: torch.device | str = "cuda",
    shapes: dict[str, tuple[int, int, int]] | None = None,
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16),
    timer: Callable[[Callable[[], object]], float] | None = None,
    path: Path | None = None,
) -> list[dict]:
    """Time every candidate on ``device`` at ``shapes`` ({name: (heads, head dim, tokens)}, default:
    the FLUX.1 / SD3.5 shapes the kernel ships) and store the fastest correct one per
    (head dim, dtype). Returns one row per (shape, dtype, candidate): ms, TFLOP/s, error, chosen."""
    device = torch.device(device)
    if device.type != "cuda" and timer is None:
        raise InputError("fastflow tune measures attention on a CUDA GPU; none is visible to torch")
    if shapes is None:
        from fastflow.kernels.attention import ATTENTION_SHAPES as shapes
    timer = timer or _default_timer
    path = path or table_path()
    machine = machine_key(device)
    rows: list[dict] = []
    totals: dict[str, dict[str, float | None]] = {}  # (head dim, dtype) -> backend -> summed ms (None: failed)
    gen = torch.Generator(device=device).manual_seed(0)
    for shape_name, (heads, d, tokens) in shapes.items():
        for dtype in dtypes:
            q, k, v = (torch.randn(1, heads, tokens, d, generator=gen, device=device).to(dtype) for _ in range(3))
            want = attention_ref(q.float(), k.float(), v.float())
            budget = 4 * (attention_ref(q, k, v).float() - want).abs().max().item() + 1e-3
            flops = 4 * heads * tokens * tokens * d
            sums = totals.setdefault(entry_key(d, dtype), {})
            for name, backend in BACKENDS.items():
                row = {"shape": shape_name, "head_dim": d, "dtype": str(dtype).removeprefix("torch."), "backend": name}
                rows.append(row)
                if sums.get(name, 0.0) is None:
                    row["error"] = "failed at an earlier shape"
                    continue
                if not backend.available(q, k, v):
                    row["error"] = "not available"
                    sums[name] = None
                    continue
                try:
                    err = (backend.run(q, k, v, None).float() - want).abs().max().item()
                    if not err <= budget:
                        raise ArithmeticError(f"wrong result: max error {err:.3g} > {budget:.3g}")
                    ms = timer(functools.partial(backend.run, q, k, v, None))
                except Exception as e:  # a candidate that fails or is wrong here never wins
                    row["error"] = tune_table.short_error(e)
                    sums[name] = None
                    continue
                row.update(ms=ms, tflops=flops / ms / 1e9)
                sums[name] = sums.get(name, 0.0) + ms
    best = {}
    for key, sums in totals.items():
        timed = {name: ms for name, ms in sums.items() if ms is not None}
        if timed:
            name = min(timed, key=timed.get)
            best[key] = {"backend": name, "ms": timed[name]}
            if timed.get("sdpa"):  # by how much the winner beats plain SDPA
                best[key]["speedup"] = timed["sdpa"] / timed[name]
    for row in rows:
        row["chosen"] = (
            best.get(entry_key(row["head_dim"], getattr(torch, row["dtype"])), {}).get("backend") == row["backend"]
        )
    table = read_table(path, strict=True)
    table[machine] = best
    tune_table.write(path, table)  # checked: refuses a folder not safely ours
    forget()
    return rows
