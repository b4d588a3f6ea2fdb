"""Feature caching: block work saved, wall time, and quality, policy by policy.

    python bench/caching.py                 # everything (about 25 min on 2 CPU cores)
    python bench/caching.py --only digits   # one section: digits | identical | tiny | width | steps | compose

Sections:
  identical  threshold 0 / an all-compute schedule against cache=None: bit-identical latents.
  digits     the embedded model at 28 and 50 steps: per policy the block work computed, the wall-time
             ratio to no cache (alternating runs, median of 3), FD-digits and prompt accuracy
             (50 images per digit, bench/quality.py's protocol), with the searched schedules in
             bench/schedules/ (fastflow tune-cache).
  tiny       random-weight FLUX and MMDiT: PSNR (latents) and SSIM (decoded) to the uncached output.
  width      a FLUX-width model (hidden 3072, 2 double + 2 single blocks, fp32): time ratio against
             block-work ratio, and the policies' own overhead.
  steps      a searched 4-step sigma schedule (fastflow tune-steps) against the uniform one.
  compose    caching with Kontext, true CFG, SD3 CFG + skip-layer guidance, batch > 1 and
             torch.compile of the blocks (graph breaks counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from _ops_common import git_sha, write_json

import fastflow
from fastflow.caching import DBCache, FBCache, Schedule, TaylorSeer, TeaCache
from fastflow.evaluation import PER_DIGIT, Yardstick, generate, psnr, ssim
from fastflow.loading import DEFAULT_MODEL

HERE = Path(__file__).resolve().parent
SCHEDULES = HERE / "schedules"
ECAD_WORK = (0.25, 0.33, 0.4, 0.5)  # the searched front points nearest these block-work shares are benched


def policies(steps: int) -> list[tuple[str, object]]:
    rows = [("none", None)]
    rows += [(f"fbcache {t}", FBCache(t)) for t in (0.05, 0.1, 0.2)]
    rows += [(f"teacache {t}", TeaCache(t)) for t in (0.2, 0.4, 0.8)]
    rows += [(f"taylorseer O{o} N{n}", TaylorSeer(order=o, interval=n)) for o, n in ((1, 2), (2, 3), (1, 3))]
    rows += [(f"dbcache F1B1 {t}", DBCache(1, 1, t)) for t in (0.1, 0.2)]
    front = [Schedule.load(p) for p in sorted(SCHEDULES.glob(f"*-{steps}steps-*.json"))]
    chosen = {min(front, key=lambda s: abs(s.work - target)).source for target in ECAD_WORK if front}
    rows += [(f"ecad {s.work:.2f}", s) for s in front if s.source in chosen]
    return rows


def embedded(threads: int = 1):
    torch.set_num_threads(threads)
    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def side_by_side(pipe, policy, call: dict, reps: int = 3) -> float:
    """Median over ``reps`` of (denoise time with the policy) / (without), runs alternating."""
    ratios = []
    for _ in range(reps):
        base = pipe(**call, cache=None).timings["denoise"]
        cached = pipe(**call, cache=policy).timings["denoise"]
        ratios.append(cached / base)
    return statistics.median(ratios)


RESULTS: list[dict] = []


def table(title: str, header: list[str], rows: list[list]) -> None:
    RESULTS.extend({"table": title, **dict(zip(header, map(str, row), strict=True))} for row in rows)
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |", flush=True)


# -- sections --------------------------------------------------------------------------------------
def section_identical() -> None:
    pipe = embedded()
    call = {
        "prompt": ["a handwritten seven", "number two"],
        "seed": 3,
        "num_inference_steps": 28,
        "output_type": "latent",
    }
    base = pipe(**call).images
    rows = []
    for name, policy in [
        ("fbcache 0", FBCache(0)),
        ("teacache 0", TeaCache(0)),
        ("dbcache F1B1 0", DBCache(1, 1, 0)),
        ("all-compute schedule", Schedule([[1] * 4] * 28)),
    ]:
        out = pipe(**call, cache=policy)
        rows.append([name, out.stats["blocks_computed"], out.stats["blocks_total"], torch.equal(out.images, base)])
    table(
        "Threshold 0 / all-compute against cache=None (embedded model, 28 steps)",
        ["policy", "blocks computed", "blocks total", "bit-identical"],
        rows,
    )


def section_digits(per_digit: int, step_counts) -> None:
    pipe = embedded()
    stick = Yardstick()
    print(f"\nFD floor (real half vs half) {stick.fd_floor:.3f}; {per_digit} images per digit")
    timing_call = {"prompt": ["a handwritten four"] * 4, "seed": 0, "output_type": "latent"}
    for steps in step_counts:
        rows, base_fd = [], None
        for name, policy in policies(steps):
            works = []
            images, labels = generate(pipe, per_digit, stats=works, num_inference_steps=steps, cache=policy)
            score = stick.score(images, labels)
            computed = sum(w["blocks_computed"] for w in works) / sum(w["blocks_total"] for w in works)
            ratio = 1.0 if policy is None else side_by_side(pipe, policy, {**timing_call, "num_inference_steps": steps})
            base_fd = score["fd_digits"] if policy is None else base_fd
            rows.append(
                [name, computed, ratio, score["fd_digits"], score["fd_digits"] / base_fd - 1, score["prompt_accuracy"]]
            )
        table(
            f"Embedded model, {steps} steps",
            ["policy", "block work computed", "time ratio", "FD-digits", "FD vs none", "accuracy"],
            rows,
        )


def _tiny_pipes():
    from fastflow.models import AutoEncoder, Flux, MMDiT, from_name
    from fastflow.pipelines import FluxPipeline, SD3Pipeline

    torch.manual_seed(0)
    flux = FluxPipeline(Flux(from_name("flux-tiny-dev")).eval(), AutoEncoder(from_name("vae-tiny-flux")).eval())
    sd3 = SD3Pipeline(MMDiT(from_name("sd3.5-tiny-medium")).eval(), AutoEncoder(from_name("vae-tiny-sd3")).eval())
    for pipe in (flux, sd3):
        pipe.set_progress_bar_config(disable=True)
    return flux, sd3


def _embeds(pipe, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if pipe.config.family == "flux":
        c = pipe.config
        return {
            "prompt_embeds": torch.randn(batch, 16, c.context_in_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, c.vec_in_dim, generator=g),
        }
    c = pipe.config
    return {
        "prompt_embeds": torch.randn(batch, 24, c.context_in_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(batch, c.adm_in_dim, generator=g),
        "negative_prompt_embeds": torch.randn(batch, 24, c.context_in_dim, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(batch, c.adm_in_dim, generator=g),
    }


def _distance(pipe, call: dict, policy) -> tuple[float, float, dict]:
    base_latent = pipe(**call, output_type="latent").images
    out_latent = pipe(**call, output_type="latent", cache=policy)
    base_img, img = pipe(**call, output_type="pt").images, pipe(**call, output_type="pt", cache=policy).images
    return psnr(out_latent.images, base_latent), ssim(img, base_img), out_latent.stats


def section_tiny() -> None:
    flux, sd3 = _tiny_pipes()
    for pipe, extra in ((flux, {"guidance_scale": 3.5}), (sd3, {"guidance_scale": 4.5})):
        side = min(64, pipe.max_side)
        call = {**_embeds(pipe), "height": side, "width": side, "num_inference_steps": 28, "seed": 1, **extra}
        rows = []
        for name, policy in policies(28)[1:]:
            if isinstance(policy, Schedule):
                continue
            try:
                p, s, stats = _distance(pipe, call, policy)
            except fastflow.errors.InputError as e:  # e.g. dbcache F1B1 on a 2-block model
                rows.append([name, "n/a", str(e).split(":")[0], ""])
                continue
            rows.append([name, 1 - stats["work_saved"], p, s])
        table(
            f"Random-weight {pipe.config.name}, 28 steps, {side}x{side}",
            ["policy", "block work computed", "PSNR latent dB", "SSIM image"],
            rows,
        )


def section_width(steps: int = 8) -> None:
    from fastflow.models import AutoEncoder, Flux, FluxConfig, from_name
    from fastflow.pipelines import FluxPipeline

    torch.set_num_threads(2)
    cfg = FluxConfig(name="flux-width-2+2", depth=2, depth_single_blocks=2, guidance_embed=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model = Flux(cfg).eval()
        for p in model.parameters():
            p.mul_(0.5)  # keep random activations in range over the blocks
    pipe = FluxPipeline(model, AutoEncoder(from_name("vae-tiny-flux")).eval())
    pipe.set_progress_bar_config(disable=True)
    call = {
        **_embeds(pipe),
        "height": 128,
        "width": 128,
        "num_inference_steps": steps,
        "seed": 0,
        "output_type": "latent",
        "guidance_scale": 3.5,
    }
    rows = []
    for name, policy in [
        ("fbcache 0.2", FBCache(0.2)),
        ("teacache 0.4", TeaCache(0.4)),
        ("taylorseer O1 N2", TaylorSeer(order=1, interval=2)),
        ("dbcache F1B1 0.2", DBCache(1, 1, 0.2)),
        ("half schedule", Schedule([[1] * 4] + [[i % 2 == 0] * 4 for i in range(1, steps)])),
    ]:
        base = pipe(**call)
        out = pipe(**call, cache=policy)
        work = out.stats["blocks_computed"] / out.stats["blocks_total"]
        time_ratio = out.timings["denoise"] / base.timings["denoise"]
        overhead = (out.timings["denoise"] - base.timings["denoise"] * work) / base.timings["denoise"]
        rows.append([name, work, time_ratio, abs(time_ratio - work) / work, overhead])
    table(
        f"FLUX width (3072, 2+2 blocks, fp32 CPU), 128x128, {steps} steps",
        ["policy", "block work", "time ratio", "|time - work| / work", "non-block overhead"],
        rows,
    )


def section_steps(per_digit: int) -> None:
    pipe = embedded()
    stick = Yardstick()
    searched = json.loads((SCHEDULES / "fastflow-tiny-digits-4steps.json").read_text())["sigmas"]
    rows = []
    for name, sigmas in (("uniform", [1.0, 0.75, 0.5, 0.25]), ("searched (tune-steps)", searched)):
        images, labels = generate(pipe, per_digit, num_inference_steps=4, sigmas=sigmas)
        score = stick.score(images, labels)
        rows.append([name, ", ".join(f"{s:.3f}" for s in sigmas), score["fd_digits"], score["prompt_accuracy"]])
    table("Embedded model, 4 Euler steps", ["sigmas", "values", "FD-digits", "accuracy"], rows)


def section_compose() -> None:
    from torch._dynamo.utils import counters

    from fastflow.models import AutoEncoder, Flux, from_name
    from fastflow.pipelines import FluxPipeline

    flux, sd3 = _tiny_pipes()
    torch.manual_seed(0)
    kontext = FluxPipeline(Flux(from_name("flux-tiny-kontext")).eval(), AutoEncoder(from_name("vae-tiny-flux")).eval())
    kontext.set_progress_bar_config(disable=True)
    from PIL import Image

    image = Image.fromarray((torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy())
    cases = [
        ("Kontext edit", kontext, {**_embeds(kontext), "image": image, "guidance_scale": 2.5, "auto_resize": False}),
        (
            "FLUX true CFG 1.5",
            flux,
            {
                **_embeds(flux),
                "true_cfg_scale": 1.5,
                "negative_prompt_embeds": _embeds(flux, seed=1)["prompt_embeds"],
                "negative_pooled_prompt_embeds": _embeds(flux, seed=1)["pooled_prompt_embeds"],
                "guidance_scale": 3.5,
            },
        ),
        ("SD3 CFG + SLG", sd3, {**_embeds(sd3), "guidance_scale": 4.5, "skip_guidance_layers": [1]}),
        ("FLUX batch 3", flux, {**_embeds(flux, batch=3), "guidance_scale": 3.5}),
    ]
    rows = []
    for name, pipe, extra in cases:
        side = min(64, pipe.max_side)
        call = {"height": side, "width": side, "num_inference_steps": 12, "seed": 2, **extra}
        for label, policy in (("taylorseer O1 N2", TaylorSeer(order=1, interval=2)), ("teacache 0.4", TeaCache(0.4))):
            p, s, stats = _distance(pipe, call, policy)
            rows.append([name, label, 1 - stats["work_saved"], stats["transformer_calls"], p, s])
    for block in list(flux.transformer.double_blocks) + list(flux.transformer.single_blocks):
        block.compile(backend="aot_eager", fullgraph=True)  # fullgraph: a break inside a block raises
    counters.clear()
    call = {**_embeds(flux), "height": 64, "width": 64, "num_inference_steps": 12, "seed": 2, "guidance_scale": 3.5}
    p, s, stats = _distance(flux, call, TeaCache(0.4))
    breaks = sum(counters["graph_break"].values())
    rows.append(
        ["torch.compile(fullgraph) blocks", "teacache 0.4", 1 - stats["work_saved"], stats["transformer_calls"], p, s]
    )
    table(
        "Caching composes (random-weight tiny models, 12 steps)",
        ["case", "policy", "block work", "forwards", "PSNR latent dB", "SSIM image"],
        rows,
    )
    print(f"\ngraph breaks inside compiled blocks: {breaks}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ["identical", "digits", "tiny", "width", "steps", "compose"]
    parser.add_argument("--only", nargs="*", default=None, choices=names, help="run these sections only")
    parser.add_argument("--per-digit", type=int, default=PER_DIGIT)
    parser.add_argument("--steps", type=int, nargs="*", default=[28, 50])
    parser.add_argument("--json", default=None, help="append every table row to this JSON-lines file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    sections = {
        "identical": section_identical,
        "digits": lambda: section_digits(args.per_digit, args.steps),
        "tiny": section_tiny,
        "width": section_width,
        "steps": lambda: section_steps(args.per_digit),
        "compose": section_compose,
    }
    for name, run in sections.items():
        if args.only is None or name in args.only:
            run()
    print(f"\n(bench/caching.py ran {time.perf_counter() - t0:.0f} s)")
    write_json([dict(row, git=git_sha(), torch=torch.__version__) for row in RESULTS], args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
