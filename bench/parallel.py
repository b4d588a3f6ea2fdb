"""Multi-GPU (issue 34): communication per denoising step, COUNTED from the collectives fastflow's
parallel path issues, a PROJECTED H100 step time (no GPU here: NO GPU TIME IS MEASURED), and a gloo
CPU run of tiny models that checks the split results (a correctness run, not a speed claim).

Counting. For each scheme the full-size transformer (FLUX.1-dev, SD3.5-large: fastflow's modules,
bf16) is built on the meta device, this process joins torch's fake process group as rank r of a
world of N (every collective returns at once with the right shapes), ``fastflow.parallel.Parallel``
installs its sharding exactly as ``pipe.enable_parallelism`` does, and one forward runs on meta
tensors under ``ops.count_comm``: every all-to-all of the attention (Ulysses q/k/v and output, the
Ring's K/V hops) and every all-gather of the output (tokens, rows) is logged with its bytes. Rank 0
and rank N - 1 are counted (uneven shards make them differ). On meta, the Ring's per-block attention
(``attention_lse``, the plain-torch reference on CPU) runs as one chunk instead of its memory-bounded
chunks: the same shapes, no collective depends on it, 8x faster to trace.

Projection (per step, one H100 SXM per rank, NVLink 4; every number is an assumption printed with
the output and settable by flags): per-rank compute = T1 x (work share) / efficiency(N), T1 the
1-GPU step; each collective takes latency + bytes / (link x achieved fraction); Ulysses' layout
copies around its all-to-alls add a fraction of their time; a Ring hop overlaps the attention of the
block at hand (exposed: what the hop takes beyond it) or not at all (both reported); the Ring's fp32
merge of partial outputs adds HBM traffic. Side by side with xDiT's published FLUX.1-dev figures.

    python bench/parallel.py [--json PATH] [--ranks 2 4 8] [--no-gloo]
    python bench/parallel.py --quick      # FLUX.1-dev at 2 / 4 ranks, SD3.5-large cfg=2; gloo: 2 ranks
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ops_common import git_sha  # noqa: E402
from parallel_gloo import PipeStandIn, gloo_rows, gloo_table  # noqa: E402

MB = 1e6


# -- what is counted ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    model: str  # registered config
    batch: int  # rows of one forward (0: one image per rank, data parallel)
    img: int  # image tokens
    txt: int  # text tokens
    skip_layers: tuple[int, ...] = ()
    blocks: dict | None = None  # config fields replaced (--quick: fewer blocks, full width and tokens)

    def config(self):
        from fastflow.models.configs import from_name

        cfg = from_name(self.model)
        return cfg.replace(**self.blocks) if self.blocks else cfg


WORKLOADS = {
    w.name: w
    for w in (
        Workload("flux", "FLUX.1-dev 1024^2 (guidance-distilled: 1 forward of 1 row per step)", "flux-dev", 1,
                 4096, 512),
        Workload("flux-data", "FLUX.1-dev 1024^2, one image per rank (-n N: 1 forward of N rows per step)",
                 "flux-dev", 0, 4096, 512),
        Workload("flux-cfg", "FLUX.1-dev 1024^2, true CFG (cond + uncond: 1 forward of 2 rows per step)",
                 "flux-dev", 2, 4096, 512),
        Workload("sd35", "SD3.5-large 1024^2, CFG (1 forward of 2 rows per step; 333 text tokens)",
                 "sd3.5-large", 2, 4096, 333),
        Workload("sd35-slg", "SD3.5-large 1024^2, the skip-layer-guidance forward (1 row, layers 7-9 skipped; "
                 "steps in the SLG window add it)", "sd3.5-large", 1, 4096, 333, (7, 8, 9)),
        Workload("flux-quick", "FLUX.1-dev width and tokens, 1 double + 1 single block (--quick)", "flux-dev", 1,
                 4096, 512, blocks={"depth": 1, "depth_single_blocks": 1}),
        Workload("sd35-quick", "SD3.5-large width and tokens, 2 blocks (--quick)", "sd3.5-large", 2, 4096, 333,
                 blocks={"depth": 2}),
    )
}  # fmt: skip

# (workload, sizes); sizes name ulysses / ring / cfg / data
SCHEMES = [
    *[("flux", s) for s in ({"ulysses": 2}, {"ring": 2}, {"ulysses": 4}, {"ring": 4}, {"ulysses": 2, "ring": 2},
                            {"ulysses": 8}, {"ring": 8}, {"ulysses": 4, "ring": 2}, {"ulysses": 2, "ring": 4})],
    *[("flux-data", {"data": n}) for n in (2, 4, 8)],
    *[("flux-cfg", s) for s in ({"cfg": 2}, {"cfg": 2, "ulysses": 2}, {"cfg": 2, "ulysses": 4},
                                {"cfg": 2, "ulysses": 2, "ring": 2})],
    *[("sd35", s) for s in ({"cfg": 2}, {"cfg": 2, "ulysses": 2}, {"cfg": 2, "ring": 2}, {"cfg": 2, "ulysses": 4},
                            {"cfg": 2, "ring": 4}, {"cfg": 2, "ulysses": 2, "ring": 2})],
    *[("sd35-slg", s) for s in ({"cfg": 2}, {"cfg": 2, "ulysses": 2}, {"cfg": 2, "ring": 4})],
]  # fmt: skip
QUICK = [("flux-quick", {"ulysses": 2}), ("flux-quick", {"ring": 2}), ("flux-quick", {"ulysses": 2, "ring": 2}),
         ("sd35-quick", {"cfg": 2})]  # fmt: skip


def world_of(sizes: dict) -> int:
    n = 1
    for v in sizes.values():
        n *= v
    return n


def describe(sizes: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def _build(workload: Workload):
    from fastflow.loading.plan import on_meta
    from fastflow.models.flux import Flux
    from fastflow.models.mmdit import MMDiT

    cfg = workload.config()
    with on_meta():
        model = (Flux if cfg.family == "flux" else MMDiT)(cfg)
    return model.to(torch.bfloat16)


def _inputs(model, workload: Workload, rows: int) -> tuple[tuple, dict, tuple]:
    """(args, kwargs, output shape) of one forward on meta tensors."""
    from fastflow.models.flux import Flux, make_img_ids

    m, bf = torch.device("meta"), torch.bfloat16
    c = model.config
    side = int(workload.img**0.5)  # patch grid side (packed FLUX tokens / SD3 patches)
    if isinstance(model, Flux):
        args = (torch.empty(rows, workload.img, c.in_channels, dtype=bf, device=m),
                torch.empty(rows, workload.txt, c.context_in_dim, dtype=bf, device=m),
                torch.empty(rows, c.vec_in_dim, dtype=bf, device=m), torch.empty(rows, device=m),
                make_img_ids(side, side).to(m), None, torch.empty(rows, device=m))  # fmt: skip
        return args, {}, (rows, workload.img, c.out_channels)
    p = c.patch_size
    args = (torch.empty(rows, c.in_channels, side * p, side * p, dtype=bf, device=m), torch.empty(rows, device=m),
            torch.empty(rows, workload.txt, c.context_in_dim, dtype=bf, device=m),
            torch.empty(rows, c.adm_in_dim, dtype=bf, device=m))  # fmt: skip
    kwargs = {"skip_layers": list(workload.skip_layers)} if workload.skip_layers else {}
    return args, kwargs, (rows, c.out_channels, side * p, side * p)


def _one_chunk_attention_lse(q, k, v, scale=None):
    from fastflow.ops.reference import attention_lse_ref

    return attention_lse_ref(q, k, v, scale, max_chunk_bytes=1 << 62)


def count(workload: Workload, sizes: dict, rank: int) -> dict:
    """One forward of ``workload`` as ``rank`` of a fake world split by ``sizes``: the collectives
    it issued, and what this rank computes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastflow.ops import count_comm
    from fastflow.ops import sequence_parallel as sp_module
    from fastflow.parallel.apply import Parallel
    from fastflow.parallel.mesh import ParallelConfig

    world = world_of(sizes)
    rows = workload.batch or world
    model = _build(workload)
    args, kwargs, shape = _inputs(model, workload, rows)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    real = sp_module.attention_lse
    sp_module.attention_lse = _one_chunk_attention_lse
    try:
        parallel = Parallel(PipeStandIn(model), ParallelConfig(**sizes))
        with count_comm() as log, torch.no_grad():
            out = model(*args, **kwargs)
        assert tuple(out.shape) == shape, (out.shape, shape)
        r = parallel.ranks
        share_rows = r.rows(rows)[0]
        computed_rows = share_rows.stop - share_rows.start
    finally:
        sp_module.attention_lse = real
        dist.destroy_process_group()
    return {"log": log, "computed_rows": computed_rows, "rows": rows, "seq": r.seq_size}


# once per generation (and per step with a cache policy): FLUX.1-dev 1024^2, (sizes, images)
GENERATION = [({"data": 2}, 2), ({"data": 4}, 4), ({"data": 8}, 8), ({"ulysses": 2, "ring": 2}, 1),
              ({"cfg": 2, "ulysses": 2}, 1), ({"cfg": 2, "data": 2}, 2)]  # fmt: skip
QUICK_GENERATION = [({"data": 2}, 2)]


def count_generation(sizes: dict, images: int, rank: int) -> list:
    """What ``Parallel``'s generation hooks issue as ``rank``: rank 0's random seed (counted on rank
    0 only: the fake group's broadcast carries no object to unpickle), the start noise [images, 16,
    128, 128] fp32, one cache decision (per step with a cache policy) and the decode of 1024^2 bf16
    images split by image."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastflow.ops import count_comm
    from fastflow.parallel.apply import ChangeReducer, Parallel
    from fastflow.parallel.mesh import ParallelConfig

    m = torch.device("meta")
    model = _build(WORKLOADS["flux"])
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_of(sizes))
    try:
        parallel = Parallel(PipeStandIn(model), ParallelConfig(**sizes))
        rows = images * (2 if sizes.get("cfg", 1) > 1 else 1)  # the forward's batch (true CFG: 2 rows per image)
        with count_comm() as log:
            if rank == 0:
                parallel.request({"seed": None})
            parallel.plan(SimpleNamespace(noise=torch.empty(images, 16, 128, 128, device=m)))
            share, parallel.ranks.real_rows = parallel.ranks.rows(rows)
            n = share.stop - share.start
            ChangeReducer(parallel.ranks)(torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64), 1)
            decode = lambda z: torch.empty(z.shape[0], 3, 1024, 1024, dtype=torch.bfloat16, device=m)  # noqa: E731
            parallel.decode(decode, torch.empty(images, 16, 128, 128, device=m))
    finally:
        dist.destroy_process_group()
    return log


def run_generation(cases) -> list[dict]:
    rows = []
    for sizes, images in cases:
        world = world_of(sizes)
        for rank in (0, world - 1):
            log = count_generation(sizes, images, rank)
            rows.append({"scheme": describe(sizes), "ranks": world, "images": images, "rank": rank,
                         "collectives": [asdict(r) for r in log]})  # fmt: skip
    return rows


def generation_table(rows: list[dict]) -> str:
    lines = ["### Once per generation, and per step with a cache policy (FLUX.1-dev 1024^2; counted)", "",
             "| scheme | images | rank | seed broadcast B | noise broadcast MB | cache decision B (per step) | "
             "decode gather MB |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        by = {}
        for c in r["collectives"]:
            sent = by.setdefault(c["kind"], [0, 0])
            sent[0] += c["sent_bytes"]
            sent[1] += c["received_bytes"]
        noise = by.get("broadcast_noise", [0, 0])
        lines.append(f"| {r['scheme']} | {r['images']} | {r['rank']} | {by.get('broadcast_seed', [0])[0]} | "
                     f"{noise[0] / MB:.2f} sent, {noise[1] / MB:.2f} received | {by.get('reduce_change', [0])[0]} | "
                     f"{by.get('decode_rows', [0])[0] / MB:.2f} |")  # fmt: skip
    lines += ["", "One image is decoded whole on every rank (no gather); each rank's cache decision adds two "
              "all-reduces of a few bytes (sequence group, then batch group). Bytes: a direct exchange's (a "
              "broadcast: the root sends to each other rank)."]  # fmt: skip
    return "\n".join(lines)


def summarize(log) -> dict:
    groups: dict[tuple, dict] = {}
    for rec in log:
        key = (rec.kind, rec.collective, rec.group_size, rec.sent_bytes, rec.received_bytes)
        groups.setdefault(
            key,
            {
                "kind": rec.kind,
                "collective": rec.collective,
                "group_size": rec.group_size,
                "sent_bytes": rec.sent_bytes,
                "received_bytes": rec.received_bytes,
                "count": 0,
            },
        )
        groups[key]["count"] += 1  # fmt: skip
    return {
        "collectives": len(log),
        "sent_bytes": sum(r.sent_bytes for r in log),
        "received_bytes": sum(r.received_bytes for r in log),
        "per_collective": list(groups.values()),
    }


# -- the projection ---------------------------------------------------------------------------------------
XDIT_URL = "https://github.com/xdit-project/xDiT/blob/main/docs/performance/flux.md"
XDIT = {  # FLUX.1-dev 1024^2, 28 steps, H100, torch.compile: seconds per image (the URL above)
    "1 GPU": 4.30, "ulysses=2": 2.68, "ring=2": 2.60, "ulysses=2,ring=2": 1.80, "ulysses=4": 1.63, "ring=4": 1.98,
}  # fmt: skip
NCCL_URL = "https://github.com/NVIDIA/nccl-tests/issues/212"
PERMUTE_URL = "https://github.com/pytorch/pytorch/issues/178066"


@dataclass
class Assumptions:
    t1_ms: float = 4300 / 28  # 1-GPU FLUX.1-dev 1024^2 step, from xDiT's 4.30 s / 28 steps (compiled, H100)
    link_gbps: float = 450.0  # NVLink 4 per GPU per direction (18 links x 25 GB/s)
    comm_eff: float = 0.6  # achieved fraction for all-to-all / all-gather of 1-30 MB messages
    latency_us: float = 15.0  # per collective (launch + synchronisation)
    layout_copy: float = 0.38  # Ulysses' permutes, a fraction of the all-to-all's time (pytorch#178066, H100)
    attn_tflops: float = 500.0  # attention throughput: what a Ring hop can hide behind
    hbm_gbps: float = 3350 * 0.8  # the Ring's fp32 merge of partial outputs
    compute_eff: dict = field(default_factory=lambda: {1: 1.0, 2: 0.95, 4: 0.9, 8: 0.85})
    steps: int = 28

    def lines(self) -> list[str]:
        return [
            f"- 1-GPU step T1 = {self.t1_ms:.1f} ms: xDiT's FLUX.1-dev 1024^2 4.30 s / 28 steps on one H100, compiled "
            f"({XDIT_URL}); it includes the text encoders and the VAE decode, so the step is slightly less. "
            "fastflow's own per-part roofline numbers (linear layers 60.4 ms at the bf16 peak, bench_fp8_linear.py; "
            "attention 20.1-25.2 ms FA3 class, projection.py; other ops 14.5 ms, compile_bytes.py) sum to 95-100 ms, "
            "~140 ms at 70% of those rooflines: `--t1-ms 140` for that case. SD3.5-large: T1 scaled by the "
            "forward's FLOPs (24 h^2 L + 4 h L^2 per block) to FLUX.1-dev's",
            f"- compute per rank = T1 x (share of the rows x tokens it computes) / efficiency, efficiency "
            f"{self.compute_eff} by ranks (smaller GEMMs, the embed run whole on every rank: assumed, not measured)",
            f"- NVLink 4: {self.link_gbps:.0f} GB/s per GPU per direction, {self.comm_eff:.0%} achieved for these "
            f"1-30 MB all-to-alls / all-gathers (NCCL's large-message ceiling is ~370 GB/s, 82%: {NCCL_URL}), "
            f"+ {self.latency_us:.0f} us per collective; a collective's time = its larger of sent / received bytes",
            f"- Ulysses' layout copies around each all-to-all: +{self.layout_copy:.0%} of its time ({PERMUTE_URL}: "
            "permutes ~38% of the all-to-all time on H100); not overlapped",
            f"- Ring: a hop overlaps the attention of the block at hand ({self.attn_tflops:.0f} TFLOP/s; exposed = "
            f"the hop's time beyond it) or nothing ('no overlap'); each merge of partial outputs moves 10 bytes per "
            f"output element at {self.hbm_gbps:.0f} GB/s",
        ]


def row_flops(c, img: int, txt: int, skipped: int = 0) -> float:
    """FLOPs of one row of one forward of config ``c``: per block 24 h^2 L (the linear layers) + 4 h L^2
    (attention)."""
    blocks = (c.depth + c.depth_single_blocks if c.family == "flux" else c.depth) - skipped
    h, n = c.hidden_size, img + txt
    return blocks * (24 * h * h * n + 4 * h * n * n)


def project(workload: Workload, sizes: dict, counted: dict, a: Assumptions) -> dict:
    from fastflow.models.configs import from_name

    world = world_of(sizes)
    c = workload.config()
    u, r = sizes.get("ulysses", 1), sizes.get("ring", 1)
    base = row_flops(from_name("flux-dev"), 4096, 512)
    rows = counted["rows"]
    forward_ms = a.t1_ms * rows * row_flops(c, workload.img, workload.txt, len(workload.skip_layers)) / base
    share = counted["computed_rows"] / rows / counted["seq"]
    compute = forward_ms * share / a.compute_eff[world]
    bw = a.link_gbps * 1e9 * a.comm_eff
    n_q = (workload.img + workload.txt) / r  # tokens per ring rank (even shards)
    comm = exposed = merge = 0.0
    for g in counted["summary"]["per_collective"]:
        t = a.latency_us * 1e-6 + max(g["sent_bytes"], g["received_bytes"]) / bw
        if g["kind"].startswith("ulysses"):
            t *= 1 + a.layout_copy
        hidden = 0.0
        if g["kind"] == "ring_kv":
            hidden = min(t, n_q * g["received_bytes"] / (a.attn_tflops * 1e12))  # 4 rows h/u n_q n_k d FLOPs
            elements = counted["computed_rows"] * c.num_heads / u * n_q * c.head_dim
            merge += g["count"] * 10 * elements / (a.hbm_gbps * 1e9)
        comm += g["count"] * t
        exposed += g["count"] * (t - hidden)
    ms = {"compute_ms": compute + 1e3 * merge, "comm_ms": 1e3 * comm, "exposed_comm_ms": 1e3 * exposed}
    ms["step_ms_no_overlap"] = ms["compute_ms"] + ms["comm_ms"]
    ms["step_ms"] = ms["compute_ms"] + ms["exposed_comm_ms"]
    ms["one_gpu_ms"] = forward_ms
    ms["speedup"] = forward_ms / ms["step_ms"]  # flux-data: N images per step either way, so per image too
    ms["steps_s"] = a.steps * ms["step_ms"] / 1e3
    ms["xdit_s"] = XDIT.get(describe(sizes)) if workload.name == "flux" else None
    return ms


# -- running it ---------------------------------------------------------------------------------------------
def run_counts(schemes, a: Assumptions, progress=print) -> list[dict]:
    from fastflow.errors import ParallelError

    rows = []
    for name, sizes in schemes:
        w, world = WORKLOADS[name], world_of(sizes)
        row = {"workload": name, "label": w.label, "scheme": describe(sizes), "ranks": world}
        try:
            first = count(w, sizes, 0)
            last = count(w, sizes, world - 1)
        except ParallelError as e:
            rows.append({**row, "refused": f"ParallelError: {e}"})
            progress(f"{name} {describe(sizes)}: refused ({e})")
            continue
        s0, s1 = summarize(first["log"]), summarize(last["log"])
        first["summary"] = s0
        row.update(rank0=s0, last_rank={k: s1[k] for k in ("collectives", "sent_bytes", "received_bytes")},
                   projection=project(w, sizes, first, a))  # fmt: skip
        rows.append(row)
        progress(f"{name} {describe(sizes)}: {s0['sent_bytes'] / MB:.1f} MB sent by rank 0 in {s0['collectives']} "
                 f"collectives (rank {world - 1}: {s1['sent_bytes'] / MB:.1f} MB)")  # fmt: skip
    return rows


def comm_table(rows: list[dict]) -> str:
    lines = ["### Communication per denoising step (counted; bf16; per rank)", "",
             "| workload | scheme | ranks | sent MB (rank 0) | received MB | collectives | last rank sent MB | "
             "per collective (count x kind: MB sent) |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['workload']} | {r['scheme']} | {r['ranks']} | refused: {r['refused']} | | | | |")
            continue
        s = r["rank0"]
        each = "; ".join(f"{g['count']} x {g['kind']} ({g['collective']}, {g['group_size']} ranks): "
                         f"{g['sent_bytes'] / MB:.2f}" for g in s["per_collective"])  # fmt: skip
        lines.append(f"| {r['workload']} | {r['scheme']} | {r['ranks']} | {s['sent_bytes'] / MB:.1f} | "
                     f"{s['received_bytes'] / MB:.1f} | {s['collectives']} | {r['last_rank']['sent_bytes'] / MB:.1f} | "
                     f"{each} |")  # fmt: skip
    return "\n".join(lines)


def projection_table(rows: list[dict], a: Assumptions) -> str:
    lines = ["### Projected step on H100 SXM + NVLink 4 (PROJECTION: no GPU ran this)", "", *a.lines(), "",
             "| workload | scheme | ranks | 1 GPU ms | compute ms | comm ms | exposed comm ms (ring overlapped) | "
             "step ms (no overlap) | step ms | speedup | 28 steps s | xDiT 28 steps s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "refused" in r:
            continue
        p = r["projection"]
        xdit = "" if p["xdit_s"] is None else f"{p['xdit_s']:.2f} ({XDIT['1 GPU'] / p['xdit_s']:.2f}x)"
        lines.append(f"| {r['workload']} | {r['scheme']} | {r['ranks']} | {p['one_gpu_ms']:.1f} | "
                     f"{p['compute_ms']:.1f} | {p['comm_ms']:.1f} | {p['exposed_comm_ms']:.1f} | "
                     f"{p['step_ms_no_overlap']:.1f} | {p['step_ms']:.1f} | {p['speedup']:.2f}x | {p['steps_s']:.2f} | "
                     f"{xdit} |")  # fmt: skip
    lines += ["", f"1 GPU, 28 steps: {a.steps * a.t1_ms / 1e3:.2f} s here; xDiT {XDIT['1 GPU']:.2f} s. flux-data: "
              "N images per step on N ranks (speedup per image). sd35-slg: the extra forward of steps in the SLG "
              "window; with cfg=2 its single row runs whole on both cfg ranks (share 1/seq, not 1/world)."]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few schemes at 2 / 4 ranks; gloo: 2 ranks")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8], help="world sizes to count")
    parser.add_argument("--no-gloo", action="store_true", help="skip the gloo CPU correctness run")
    parser.add_argument("--t1-ms", type=float, default=Assumptions.t1_ms, help="1-GPU FLUX.1-dev step (ms)")
    parser.add_argument("--comm-eff", type=float, default=Assumptions.comm_eff)
    parser.add_argument("--link-gbps", type=float, default=Assumptions.link_gbps)
    parser.add_argument("--json", help="append one row per scheme (and gloo run) to this JSON-lines file")
    args = parser.parse_args(argv)
    a = Assumptions(t1_ms=args.t1_ms, comm_eff=args.comm_eff, link_gbps=args.link_gbps)
    schemes = QUICK if args.quick else [s for s in SCHEMES if world_of(s[1]) in args.ranks]
    print("Counted on the meta device under torch's fake process group (one process acting as rank 0 and as the "
          "last rank); the Ring's block attention runs as one chunk there (same shapes). NO GPU: the times are a "
          "projection.\n", flush=True)  # fmt: skip
    rows = run_counts(schemes, a, progress=lambda s: print("  " + s, flush=True))
    generation = run_generation(QUICK_GENERATION if args.quick else GENERATION)
    print("\n" + comm_table(rows) + "\n\n" + generation_table(generation) + "\n\n" + projection_table(rows, a) + "\n",
          flush=True)  # fmt: skip
    gloo = [] if args.no_gloo else gloo_rows(quick=args.quick)
    if gloo:
        print(gloo_table(gloo) + "\n", flush=True)
    if args.json:
        sha = git_sha()
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps({"bench": "parallel", "part": "comm", "sha": sha, "quick": args.quick,
                                     "assumptions": asdict(a), **r}) + "\n")  # fmt: skip
            for r in generation:
                fh.write(json.dumps({"bench": "parallel", "part": "generation", "sha": sha, "quick": args.quick, **r})
                         + "\n")  # fmt: skip
            for r in gloo:
                fh.write(json.dumps({"bench": "parallel", "part": "gloo", "sha": sha, "quick": args.quick, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
