"""torch.compile on CPU, side by side in one run: diffusers' FluxTransformer2DModel at FLUX width
(3072, 24 heads, 2 double + 2 single blocks by default) and fastflow's FLUX with the same weights;
eager vs ``torch.compile`` (inductor) vs ``backend="fastflow"``, fp32 and bf16. Each variant is
timed in alternation with the others (median of --reps), on --threads threads (default 1: on 2
cores, 2 threads are slower for small work). Then the compile time and the number of compiles
over three resolutions, and the rewrite report.

    python bench/compile.py [--tokens 1024 --txt 128] [--reps 3] [--dtypes float32 bfloat16] [--json PATH]

Then the non-GEMM bytes per FLUX.1-dev step at three resolutions, diffusers eager vs the graph
after the backend's rewrites (bench/compile_bytes.py: counted on the meta device, no time measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _ops_common import git_sha


def _models(depth: int, single: int, width_heads: int, dtype):
    import diffusers

    from fastflow.loading.keymaps import flux_from_diffusers
    from fastflow.models import Flux
    from fastflow.models.configs import FluxConfig

    torch.manual_seed(0)
    theirs = diffusers.FluxTransformer2DModel(
        num_layers=depth,
        num_single_layers=single,
        attention_head_dim=128,
        num_attention_heads=width_heads,
        guidance_embeds=True,
    ).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.02)
    cfg = FluxConfig(name="flux-bench", hidden_size=128 * width_heads, num_heads=width_heads, depth=depth,
                     depth_single_blocks=single)  # fmt: skip
    with torch.device("meta"):
        ours = Flux(cfg)
    src = theirs.state_dict()
    state = {k: torch.cat([s.take(src[s.key]) for s in flux_from_diffusers(k, cfg)]) for k in ours.state_dict()}
    ours.load_state_dict(state, assign=True)
    return theirs.to(dtype), ours.eval().to(dtype)


def _inputs(tokens: int, txt: int, dtype, side: int | None = None):
    from fastflow.models.flux import make_img_ids

    g = torch.Generator().manual_seed(1)
    h = side or int(tokens**0.5)
    w = tokens // h
    img = torch.randn(1, h * w, 64, generator=g).to(dtype)
    ctx = torch.randn(1, txt, 4096, generator=g).to(dtype)
    pooled = torch.randn(1, 768, generator=g).to(dtype)
    ids = make_img_ids(h, w)
    t, guidance = torch.tensor([0.5], dtype=dtype), torch.tensor([3.5], dtype=dtype)
    theirs = dict(hidden_states=img, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t,
                  img_ids=ids.to(dtype), txt_ids=torch.zeros(txt, 3, dtype=dtype), guidance=guidance)  # fmt: skip
    ours = ((img, ctx, pooled, t, ids), {"guidance": guidance})
    return theirs, ours


def _runner(model, kind: str, inputs, backend):
    fn = model if backend is None else torch.compile(model, backend=backend)
    if kind == "theirs":
        return lambda: fn(**inputs).sample
    args, kwargs = inputs
    return lambda: fn(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--txt", type=int, default=128)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--single", type=int, default=2)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the small-model trap avoided)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import fastflow.compile as fc

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        theirs, ours = _models(args.depth, args.single, args.heads, dtype)
        t_in, o_in = _inputs(args.tokens, args.txt, dtype)
        variants = {
            "diffusers eager": _runner(theirs, "theirs", t_in, None),
            "diffusers inductor": _runner(theirs, "theirs", t_in, "inductor"),
            "diffusers fastflow-backend": _runner(theirs, "theirs", t_in, "fastflow"),
            "fastflow eager": _runner(ours, "ours", o_in, None),
            "fastflow inductor": _runner(ours, "ours", o_in, "inductor"),
            "fastflow fastflow-backend": _runner(ours, "ours", o_in, "fastflow"),
        }
        torch._dynamo.reset()
        times: dict[str, list[float]] = {k: [] for k in variants}
        outputs, first, reports = {}, {}, {}
        with torch.no_grad():
            for name, fn in variants.items():  # first call: compile (timed separately)
                fc.reset()
                start = time.perf_counter()
                outputs[name] = fn().float()
                first[name] = time.perf_counter() - start
                if name.endswith("fastflow-backend"):
                    reports[name] = {k: v for k, v in fc.report().items() if v}
            for _ in range(args.reps):  # alternating, so drift hits every variant alike
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times["diffusers eager"])
        ref = outputs["diffusers eager"]
        print(f"\n{dtype_name}: {args.tokens} + {args.txt} tokens, width {128 * args.heads}, "
              f"{args.depth} double + {args.single} single blocks, {args.threads} thread(s)")  # fmt: skip
        print(f"  {'variant':<28} {'median s':>9} {'x eager':>8} {'first call s':>13} {'max rel err':>12}")
        for name in variants:
            med = statistics.median(times[name])
            err = ((outputs[name] - ref).abs().max() / ref.abs().max()).item()
            row = {"variant": name, "dtype": dtype_name, "median_s": med, "speedup_vs_diffusers_eager": base / med,
                   "first_call_s": first[name], "max_rel_err": err}  # fmt: skip
            rows.append(row)
            print(f"  {name:<28} {med:9.3f} {base / med:8.2f} {first[name]:13.1f} {err:12.2e}")
        ratio = statistics.median(times["diffusers inductor"]) / statistics.median(times["fastflow fastflow-backend"])
        print(f"  compiled fastflow (fastflow backend) vs compiled diffusers (inductor): {ratio:.2f}x")
        for name, report in reports.items():
            print(f"  rewrites, {name}: {report}")
        del theirs, ours, variants

    # compiles over three resolutions (fp32, 1 double + 1 single block), each model with the fastflow backend
    res_rows = []
    theirs, ours = _models(1, 1, args.heads, torch.float32)
    real = fc.rewrite
    for kind, model in (("fastflow", ours), ("diffusers", theirs)):
        compiles = []

        def counting(gm, example_inputs, compiles=compiles):
            compiles.append(1)
            return real(gm, example_inputs)

        fc.rewrite = counting
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fastflow")
        with torch.no_grad():
            for side, tokens in ((16, 256), (24, 576), (32, 1024)):
                t_in, (a, kw) = _inputs(tokens, args.txt, torch.float32, side)
                start = time.perf_counter()
                compiled(**t_in) if kind == "diffusers" else compiled(*a, **kw)
                res_rows.append({"model": kind, "tokens": tokens, "first_call_s": time.perf_counter() - start,
                                 "compiles": len(compiles)})  # fmt: skip
        fc.rewrite = real
    print("\nthree resolutions in a row, fastflow backend (1 double + 1 single block, fp32):")
    for r in res_rows:
        print(f"  {r['model']:<10} {r['tokens']:>5} tokens: first call {r['first_call_s']:.1f} s, "
              f"compiles so far {r['compiles']}")  # fmt: skip
    import compile_bytes

    byte_rows = compile_bytes.rows()
    compile_bytes.report(byte_rows)
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows + res_rows:
                fh.write(json.dumps({"bench": "compile", "sha": git_sha(), **r}) + "\n")
            for r in byte_rows:
                fh.write(json.dumps({"bench": "compile_bytes", "sha": git_sha(), **r}) + "\n")


if __name__ == "__main__":
    main()
