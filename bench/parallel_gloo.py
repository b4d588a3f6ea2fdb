"""The gloo CPU part of bench/parallel.py: tiny models split 1 / 2 / 4 ways over gloo ranks spawned
here (one torch thread each, file-store rendezvous, a hard timeout), each split result compared with
the same model in one process. A CORRECTNESS RUN, NOT A SPEED CLAIM: the ranks share a few CPU
cores, the models are tiny (hidden 64 / 96), and gloo over loopback is no NVLink.

* ``flux-tiny-dev`` (2 + 2 blocks, hidden 64, 2 heads; random weights, seeded), one forward at
  1024 image + 64 text tokens, fp32: Ulysses, Ring, both, CFG rows;
* the embedded ``fastflow-tiny-digits`` pipeline (FLUX layout, 3 heads, true CFG 1.5), a whole
  64x64 generation, fp32: CFG, Ring, data parallel (one image per rank).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import tempfile
import time
import traceback
from datetime import timedelta

FORWARD = "flux-tiny-dev transformer, 1 forward, 1024 + 64 tokens, fp32"
PIPELINE = "fastflow-tiny-digits pipeline, 64x64, true CFG 1.5, fp32"


class PipeStandIn:
    """What Parallel reads of a pipeline, around a bare model (Parallel keeps a weak reference to its
    pipeline, which a SimpleNamespace cannot give)."""

    def __init__(self, transformer):
        self.transformer, self.device, self._offload = transformer, "cpu", None


def scenarios(world: int, quick: bool) -> list[tuple]:
    """(what, sizes, options) run on a world of ``world`` ranks."""
    steps = 2 if quick else 8
    one, two, pipe = {"rows": 1}, {"rows": 2}, {"steps": steps, "n": 1}
    if world == 2:
        out = [
            (FORWARD, {"ulysses": 2}, one),
            (FORWARD, {"ring": 2}, one),
            (FORWARD, {"cfg": 2}, two),
            (PIPELINE, {"cfg": 2}, pipe),
            (PIPELINE, {"ring": 2}, pipe),
            (PIPELINE, {"data": 2}, dict(pipe, n=2)),
        ]
        return [out[0], out[3]] if quick else out
    return [
        (FORWARD, {"ulysses": 2, "ring": 2}, one),
        (FORWARD, {"ring": 4}, one),
        (FORWARD, {"cfg": 2, "ulysses": 2}, two),
        (PIPELINE, {"cfg": 2, "ring": 2}, pipe),
        (PIPELINE, {"ring": 4}, pipe),
        (PIPELINE, {"data": 4}, dict(pipe, n=4)),
    ]


def _forward_case(rows: int):
    import torch

    from fastflow.models.configs import from_name
    from fastflow.models.flux import Flux, make_img_ids

    torch.manual_seed(0)
    model = Flux(from_name("flux-tiny-dev")).eval()
    g = torch.Generator().manual_seed(1)
    c = model.config
    args = (torch.randn(rows, 1024, c.in_channels, generator=g), torch.randn(rows, 64, c.context_in_dim, generator=g),
            torch.randn(rows, c.vec_in_dim, generator=g), torch.rand(rows, generator=g), make_img_ids(32, 32), None,
            torch.full((rows,), 3.5))  # fmt: skip
    return model, lambda: model(*args)


def _pipeline_case(steps: int, n: int):
    import torch

    import fastflow

    pipe = fastflow.load("fastflow-tiny-digits", device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    call = {"height": 64, "width": 64, "num_inference_steps": steps, "seed": 3, "num_images_per_prompt": n}
    return pipe, lambda: pipe("a seven", **call, output_type="latent").images


def _case(what: str, options: dict):
    return _forward_case(options["rows"]) if what == FORWARD else _pipeline_case(options["steps"], options["n"])


def _timed(fn, reps: int):
    import torch

    times, out = [], None
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
    return out, 1e3 * statistics.median(times)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _worker(cases: list[tuple], reps: int) -> list[dict]:
    """On every rank: each case in one process, then split; the error and the split wall time."""
    import torch
    import torch.distributed as dist

    from fastflow.parallel.apply import Parallel
    from fastflow.parallel.mesh import ParallelConfig

    out = []
    for what, sizes, options in cases:
        obj, fn = _case(what, options)
        with torch.no_grad():
            single = fn()
        if what == FORWARD:
            undo = Parallel(PipeStandIn(obj), ParallelConfig(**sizes)).remove
        else:
            undo = obj.enable_parallelism(**sizes).disable_parallelism
        with torch.no_grad():
            fn()  # the first split call pays one-time costs (the collectives' first use)
        dist.barrier()
        split, ms = _timed(fn, reps)
        undo()
        out.append({"rel_err": _rel(split, single), "ms": ms})
    return out


def _rank_main(rank: int, world: int, store_path: str, cases, reps: int, timeout: float, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")  # fmt: skip
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        try:
            results.put((rank, _worker(cases, reps), ""))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, None, traceback.format_exc()))


def spawn(world: int, cases, reps: int, timeout: float) -> list[list[dict]]:
    """Every rank's results; raises RuntimeError naming a rank that failed or ran past ``timeout``."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    got: dict[int, list] = {}
    with tempfile.TemporaryDirectory(prefix="fastflow-bench-") as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "store"), cases, reps, timeout,
                                                      results)) for r in range(world)]  # fmt: skip
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            while len(got) < world:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"gloo run on {world} ranks: no result from ranks "
                                       f"{sorted(set(range(world)) - set(got))} within {timeout:.0f} s")  # fmt: skip
                try:
                    rank, value, tb = results.get(timeout=min(left, 1.0))
                except queue.Empty:
                    continue
                if value is None:
                    raise RuntimeError(f"gloo run on {world} ranks: rank {rank} failed:\n{tb}")
                got[rank] = value
        finally:
            for p in procs:
                p.join(5 if p.pid else 0)
                if p.is_alive():
                    p.terminate()
                    p.join(5)
    return [got[r] for r in range(world)]


def gloo_rows(quick: bool = False) -> list[dict]:
    """One row per case and world: one-process wall ms (measured here, 1 thread), split wall ms (the
    slowest rank), worst relative error over the ranks."""
    import torch

    reps = 1 if quick else 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, singles = [], {}
        for world in (2,) if quick else (2, 4):
            cases = scenarios(world, quick)
            per_rank = spawn(world, cases, reps, timeout=240 if quick else 900)
            for i, (what, sizes, options) in enumerate(cases):
                key = (what, tuple(sorted(options.items())))
                if key not in singles:
                    fn = _case(what, options)[1]
                    _timed(fn, 1)  # as on the ranks: a first call, then the timed ones
                    singles[key] = _timed(fn, reps)[1]
                results = [r[i] for r in per_rank]
                rows.append({"what": what, "options": options, "scheme": ",".join(f"{k}={v}" for k, v in sizes.items()),
                             "ranks": world, "one_process_ms": singles[key], "split_ms": max(r["ms"] for r in results),
                             "rel_err": max(r["rel_err"] for r in results), "reps": reps})  # fmt: skip
        return rows
    finally:
        torch.set_num_threads(threads)


def gloo_table(rows: list[dict]) -> str:
    import os as _os

    lines = [f"### gloo on this CPU ({_os.cpu_count()} cores shared by every rank): a CORRECTNESS run, not a speed "
             "claim", "", "| model | options | scheme | ranks | one process ms | split ms (slowest rank) | "
             "rel. err vs one process |", "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        opts = ", ".join(f"{k} {v}" for k, v in r["options"].items())
        lines.append(f"| {r['what']} | {opts} | {r['scheme']} | {r['ranks']} | {r['one_process_ms']:.0f} | "
                     f"{r['split_ms']:.0f} | {r['rel_err']:.1e} |")  # fmt: skip
    return "\n".join(lines)
