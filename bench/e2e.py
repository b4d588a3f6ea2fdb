"""Whole-model rows of the GPU run book: diffusers vs fastflow on the same random weights at full
size (bench/e2e_models.py), one step at 1024^2 in bf16.

Variants (any subset, in one process; one JSON row each, appended as soon as it is measured, so a
crash later in the process keeps the earlier rows):

- ``diffusers``: diffusers eager; ``diffusers-compile``: its blocks through torch.compile (inductor);
- ``fastflow``: fastflow eager; ``fastflow-compile``: its blocks through ``backend="fastflow"``;
- ``fastflow-fp8``: fastflow with every linear layer FP8 (``fastflow.quant.quantize_``);
- ``fastflow-fp8-cache``: FP8 plus a cache policy (TaylorSeer, full steps every 2: its saving does
  not depend on the random weights), over --cache-steps Euler steps against the same loop uncached.

Each row: ms per step (median of --reps, CUDA events around each call), peak memory (weights
included), and against diffusers' eager output in the same dtype: relative error ||out - ref|| /
||ref|| and cosine similarity (the cache row: its last latent against the uncached loop's).
``fastflow-compile`` runs apart from the FP8 variants (they change the model in place).

    python bench/e2e.py --model flux-dev --variants diffusers,diffusers-compile --json rows.jsonl
    python bench/e2e.py --model sdxl-vae --variants diffusers,fastflow --dry-run   # tiny, on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from _ops_common import git_sha
from e2e_models import MODELS, compile_blocks, diffusers_model, fastflow_model, inputs

VARIANTS = ("diffusers", "diffusers-compile", "fastflow", "fastflow-fp8", "fastflow-fp8-cache", "fastflow-compile")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, device) -> tuple[float, float, object]:
    """(first call s, median ms of the next ``reps`` calls, last output); CUDA events on a GPU."""
    start = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return first, (statistics.median(times) if times else None), out


def compare(out, ref) -> dict:
    if ref is None:
        return {}
    a, b = out.float().flatten(), ref.float().flatten()
    return {
        "rel_err": ((a - b).norm() / b.norm().clamp_min(1e-30)).item(),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "finite": bool(torch.isfinite(a).all()),
    }


def _peak_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else None


def cache_loop(model, kind: str, call, steps: int, device, policy) -> tuple[float, object, dict]:
    """``steps`` Euler steps of flow matching from sigma 1 to 0 through fastflow's CacheRunner
    (``policy`` None: every block every step). (ms per step, last latent, cache stats)."""
    from fastflow.caching import CacheRunner
    from fastflow.samplers.solvers import Step

    args, kwargs = call
    args = list(args)
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()
    runner = CacheRunner(policy, model) if policy is not None else None
    _sync(device)
    start = time.perf_counter()
    x = args[0]
    for i in range(steps):
        step = Step(sigmas[i], i, sigmas[i + 1], steps)
        t = torch.full_like(args[3 if kind == "flux" else 1], sigmas[i] * (1.0 if kind == "flux" else 1000.0))
        args[0] = x
        args[3 if kind == "flux" else 1] = t
        v = runner(step, tuple(args), kwargs) if runner else model(*args, **kwargs)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    _sync(device)
    stats = runner.stats.as_dict() if runner else {}
    return (time.perf_counter() - start) * 1e3 / steps, x, stats


def _fastflow_args(kind, cfg, side, device, dtype, text_tokens):
    """The positional / keyword inputs of one fastflow step, for the cache loop (flux, sd3)."""
    captured = {}

    class Capture(torch.nn.Module):
        def forward(self, *args, **kwargs):
            captured.update(args=args, kwargs=kwargs)

    inputs(kind, cfg, side, device, dtype, text_tokens=text_tokens)[1](Capture())
    return captured["args"], captured["kwargs"]


def run(args) -> list[dict]:
    kind, full, tiny, side = MODELS[args.model]
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    side = args.side or (8 if args.dry_run else side)
    text_tokens = 8 if args.dry_run else None
    variants = [v for v in VARIANTS if v in args.variants]
    if "fastflow-compile" in variants and any(v.startswith("fastflow-fp8") for v in variants):
        raise SystemExit("fastflow-compile runs in a process of its own (the FP8 variants change the model in place)")
    backend = {"diffusers-compile": "inductor", "fastflow-compile": "fastflow"}
    if args.dry_run:  # no C++ toolchain run on the CPU machine: the compile path with dynamo's eager backend
        backend = dict.fromkeys(backend, "eager")
    meta = {"model": args.model, "kind": kind, "config": tiny if args.dry_run else full, "side": side,
            "dtype": str(dtype).removeprefix("torch."), "dry_run": args.dry_run, "git": git_sha(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}  # fmt: skip
    rows = []

    def emit(variant, **fields):
        row = {**meta, "variant": variant, **fields}
        rows.append(row)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in fields.items()}
        print(f"{args.model:12s} {variant:20s} {shown}", flush=True)

    _peak_reset(device)
    theirs, cfg = diffusers_model(kind, tiny if args.dry_run else full, device, dtype, args.seed)
    call_theirs, call_ours = inputs(kind, cfg, side, device, dtype, text_tokens=text_tokens)
    with torch.no_grad():
        first, ms, ref = timed(lambda: call_theirs(theirs), args.reps if "diffusers" in variants else 0, device)
        ref = ref.float().clone()
        if "diffusers" in variants:
            emit("diffusers", ms_per_step=ms, first_call_s=first, peak_gib=_peak_gib(device), **compare(ref, ref))
        if "diffusers-compile" in variants:
            n = compile_blocks(theirs, backend["diffusers-compile"])
            first, ms, out = timed(lambda: call_theirs(theirs), args.reps, device)
            emit("diffusers-compile", ms_per_step=ms, compile_s=first, compiled_modules=n,
                 backend=backend["diffusers-compile"], peak_gib=_peak_gib(device), **compare(out, ref))  # fmt: skip
        ours = fastflow_model(kind, cfg, theirs) if any(v.startswith("fastflow") for v in variants) else None
        theirs = None  # its memory back before fastflow runs
        gc.collect()
        for variant in (v for v in variants if v.startswith("fastflow")):
            _peak_reset(device)
            if variant == "fastflow-fp8" or (variant == "fastflow-fp8-cache" and "fastflow-fp8" not in variants):
                from fastflow.quant import quantize_

                quantize_(ours)
                gc.collect()
            if variant == "fastflow-compile":
                n = compile_blocks(ours, backend[variant])
            if variant == "fastflow-fp8-cache":
                if kind not in ("flux", "sd3"):
                    emit(variant, skipped=f"no cache policy for {kind}")
                    continue
                from fastflow.caching import TaylorSeer

                call = _fastflow_args(kind, cfg, side, device, dtype, text_tokens)
                ms0, x0, _ = cache_loop(ours, kind, call, args.cache_steps, device, None)
                ms, x, stats = cache_loop(ours, kind, call, args.cache_steps, device, TaylorSeer(1, 2, 2))
                emit(variant, ms_per_step=ms, uncached_ms_per_step=ms0, steps=args.cache_steps, policy="taylorseer:1,2",
                     peak_gib=_peak_gib(device), **stats, **compare(x, x0))  # fmt: skip
                continue
            first, ms, out = timed(lambda: call_ours(ours), args.reps, device)
            extra = (
                {"compile_s": first, "compiled_modules": n, "backend": backend[variant]} if "compile" in variant else {}
            )
            emit(variant, ms_per_step=ms, first_call_s=first, peak_gib=_peak_gib(device), **extra, **compare(out, ref))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS[:4]))
    parser.add_argument("--reps", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--cache-steps", type=int, default=8)
    parser.add_argument("--side", type=int, default=None, help="latent side (default: 1024^2 images)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="append one row per variant to this JSON-lines file")
    parser.add_argument("--dry-run", action="store_true", help="tiny configs, random weights, on CPU (fp32)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.dry_run:
        torch.set_num_threads(1)
        args.reps, args.cache_steps = 1, min(args.cache_steps, 4)
    elif not torch.cuda.is_available():
        print("bench/e2e.py measures on a CUDA GPU; none is visible (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
