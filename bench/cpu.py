"""fastflow vs diffusers on a CPU, one run, every variant timed in alternation (round-robin) with
the others: the median of --reps wall times (ms) and of the process CPU time (s, all threads) per
call, on --threads threads (default 1: on a shared machine more threads mostly measure contention).

Workloads (random weights shared by both libraries unless named):

* ``flux``: FLUX width (hidden 3072, 24 heads), 1 double + 1 single block, 1024 image + 128 text
  tokens, one forward (diffusers' FluxTransformer2DModel and fastflow's FLUX, same weights);
* ``pipeline``: the embedded ``fastflow-tiny-digits`` model, one whole image at its defaults (16
  Euler steps, true CFG 1.5, 16x16), against diffusers' FluxPipeline built around the same weights
  (its transformer and VAE filled through fastflow's diffusers key maps, its CLIP / T5 and
  tokenizers read from the model's folder by transformers);
* ``unet``: an SDXL UNet at 0.6 width (SDXL-base's layout with model_channels 192: 192 / 384 /
  768 channels, head dim 64, transformer depth 0 / 2 / 2 and 2 in the middle), one step at a 64x64
  latent and 77 text tokens.

Variants: diffusers fp32, diffusers bf16, diffusers bf16 + torch.compile (inductor), fastflow bf16,
fastflow bf16 + compile (``backend="fastflow"``), fastflow int8 and int8 + compile (through
``fastflow.quant.quantize_(model, fastflow.quant.Int8Config())``). Compiling runs with inductor's
``emulate_precision_casts``.

    python bench/cpu.py [--threads 1] [--reps 3] [--workloads flux pipeline unet] [--json PATH]
    python bench/cpu.py --quick      # tiny sizes, 1 repeat: a smoke test (compiles: FLUX only, eager backend)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _ops_common import git_sha  # noqa: E402
from e2e_models import diffusers_model, fastflow_model, inputs  # noqa: E402

VARIANTS = [
    "diffusers fp32",
    "diffusers bf16",
    "diffusers bf16 + compile",
    "fastflow bf16",
    "fastflow bf16 + compile",
    "fastflow int8",
    "fastflow int8 + compile",
]
WORKLOADS = ("flux", "pipeline", "unet")


def int8_config():
    """The int8 variants' config: fastflow.quant.Int8Config() (W8A8, the defaults)."""
    from fastflow.quant import Int8Config

    return Int8Config()


QUICK_SKIP = "skipped in --quick: tracing this workload takes longer than the smoke test"


def _compiler(quick: bool):
    """(diffusers' compile, fastflow's compile) of a module or function."""
    if quick:  # no C++ build: dynamo's graph capture only
        return (lambda f: torch.compile(f, backend="eager")), (lambda f: torch.compile(f, backend="eager"))
    return (lambda f: torch.compile(f)), (lambda f: torch.compile(f, backend="fastflow"))


def _skip_compiles(out: dict) -> dict:
    return {k: QUICK_SKIP if k.endswith("+ compile") else v for k, v in out.items()}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-12))


def _model_variants(kind: str, cfg, side: int, text_tokens: int, quick: bool) -> dict:
    """variant -> a function of no arguments running one forward (None: skipped, with why)."""
    comp_d, comp_f = _compiler(quick)
    theirs32, cfg = diffusers_model(kind, cfg, "cpu", torch.float32)
    theirs16 = copy.deepcopy(theirs32).to(torch.bfloat16)
    ours16 = fastflow_model(kind, cfg, theirs16)
    call_d32, _ = inputs(kind, cfg, side, "cpu", torch.float32, text_tokens=text_tokens)
    call_d16, call_f16 = inputs(kind, cfg, side, "cpu", torch.bfloat16, text_tokens=text_tokens)
    out = {
        "diffusers fp32": lambda: call_d32(theirs32),
        "diffusers bf16": lambda: call_d16(theirs16),
        "diffusers bf16 + compile": (lambda m: lambda: call_d16(m))(comp_d(theirs16)),
        "fastflow bf16": lambda: call_f16(ours16),
        "fastflow bf16 + compile": (lambda m: lambda: call_f16(m))(comp_f(ours16)),
    }
    config = int8_config()
    from fastflow.quant import quantize_

    ours8 = copy.deepcopy(ours16)
    quantize_(ours8, config)
    out["fastflow int8"] = lambda: call_f16(ours8)
    out["fastflow int8 + compile"] = (lambda m: lambda: call_f16(m))(comp_f(ours8))
    return out


def _reverse_fill(theirs: torch.nn.Module, ours: torch.nn.Module, keymap, cfg) -> None:
    """``theirs`` (diffusers) given ``ours``' weights: each fastflow tensor split back along its
    key map's segments (views into diffusers' parameters)."""
    dst_state, covered = theirs.state_dict(), set()
    with torch.no_grad():
        for key, value in ours.state_dict().items():
            offset = 0
            for seg in keymap(key, cfg):
                dst = seg.take(dst_state[seg.key])
                n = dst.shape[0]
                dst.copy_(value[offset : offset + n].reshape(dst.shape))
                offset += n
                covered.add(seg.key)
    missing = set(dst_state) - covered
    if missing:
        raise RuntimeError(f"diffusers keys with no fastflow source: {sorted(missing)[:5]}")


def diffusers_tiny_pipeline(ours_pipe, folder: Path, dtype):
    """diffusers' FluxPipeline around the weights of a fastflow FLUX pipeline (``ours_pipe``, fp32)."""
    import diffusers
    from e2e_models import _diffusers_kwargs
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from fastflow.loading import keymaps

    cfg, vae_cfg = ours_pipe.transformer.config, ours_pipe.vae.config
    _, kwargs = _diffusers_kwargs("flux", cfg)
    transformer = diffusers.FluxTransformer2DModel(**kwargs).eval()
    _reverse_fill(transformer, ours_pipe.transformer, keymaps.flux_from_diffusers, cfg)
    _, kwargs = _diffusers_kwargs("vae", vae_cfg)
    vae = diffusers.AutoencoderKL(**kwargs).eval()
    _reverse_fill(vae, ours_pipe.vae, keymaps.vae_from_diffusers, vae_cfg)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=cfg.shift_schedule)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=torch.float32).eval(),
        tokenizer_2=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype)


def _pipeline_variants(quick: bool) -> dict:
    import fastflow
    from fastflow.loading import DEFAULT_MODEL

    comp_d, comp_f = _compiler(quick)
    steps = 2 if quick else None
    prompt = "a handwritten seven"

    def ours(dtype):
        pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe.num_threads = None  # the bench's --threads for every variant
        return pipe

    ours32 = ours(torch.float32)
    h, w = ours32.default_size
    n = steps or ours32.defaults["steps"]
    cfg = ours32.defaults["true_cfg"]

    def run_d(pipe):
        return lambda: pipe(prompt, negative_prompt="", true_cfg_scale=cfg, height=h, width=w, num_inference_steps=n,
                            max_sequence_length=8, generator=torch.Generator().manual_seed(1),
                            output_type="pt").images  # fmt: skip

    def run_f(pipe):
        return lambda: pipe(prompt, negative_prompt="", num_inference_steps=n, seed=1, output_type="pt").images

    d32 = diffusers_tiny_pipeline(ours32, DEFAULT_MODEL, torch.float32)
    d16, d16c = (diffusers_tiny_pipeline(ours32, DEFAULT_MODEL, torch.bfloat16) for _ in range(2))
    d16c.transformer = comp_d(d16c.transformer)
    d16c.vae.decode = comp_d(d16c.vae.decode)
    f16, f16c = ours(torch.bfloat16), ours(torch.bfloat16)
    f16c.defaults["precompute_modulation"] = False  # as fastflow.accelerate: a data-dependent lookup
    f16c.transformer = comp_f(f16c.transformer)
    f16c.vae.decode = comp_f(f16c.vae.decode)
    out = {
        "diffusers fp32": run_d(d32),
        "diffusers bf16": run_d(d16),
        "diffusers bf16 + compile": run_d(d16c),
        "fastflow bf16": run_f(f16),
        "fastflow bf16 + compile": run_f(f16c),
    }
    config = int8_config()
    from fastflow.quant import quantize_

    f8, f8c = ours(torch.bfloat16), ours(torch.bfloat16)
    for p in (f8, f8c):
        quantize_(p.transformer, config)
    f8c.defaults["precompute_modulation"] = False
    f8c.transformer = comp_f(f8c.transformer)
    f8c.vae.decode = comp_f(f8c.vae.decode)
    out["fastflow int8"], out["fastflow int8 + compile"] = run_f(f8), run_f(f8c)
    return out


def workload(name: str, quick: bool) -> tuple[str, dict]:
    from fastflow.models import from_name

    if name == "flux":
        if quick:
            return "flux-tiny-dev, 64 + 8 tokens", _model_variants("flux", "flux-tiny-dev", 8, 8, quick)
        cfg = from_name("flux-dev").replace(name="flux-width-1+1", depth=1, depth_single_blocks=1)
        return "FLUX width 1 + 1 blocks, 1024 + 128 tokens", _model_variants("flux", cfg, 32, 128, quick)
    if name == "unet":
        if quick:
            return "sdxl-tiny UNet, 16x16 latent", _skip_compiles(_model_variants("unet", "sdxl-tiny", 16, 8, quick))
        cfg = from_name("sdxl-base").replace(name="sdxl-small", model_channels=192, transformer_depth=(0, 2, 2),
                                             transformer_depth_middle=2)  # fmt: skip
        return "SDXL UNet at 0.6 width (192), 64x64 latent, 77 tokens", _model_variants("unet", cfg, 64, 77, quick)
    if quick:
        return "fastflow-tiny-digits pipeline, 2 steps", _skip_compiles(_pipeline_variants(quick))
    return "fastflow-tiny-digits pipeline, 16 steps, true CFG 1.5, 16x16", _pipeline_variants(quick)


def measure(variants: dict, reps: int) -> dict:
    """variant -> {ms, cpu_s, rel_err} (medians; round-robin over the variants, after a first call
    that also compiles), or {skipped: why}."""
    runs = {k: v for k, v in variants.items() if callable(v)}
    first, times = {}, {k: [] for k in runs}
    with torch.no_grad():
        for name, fn in runs.items():
            first[name] = fn()
        for _ in range(reps):
            for name, fn in runs.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    ref = first.get("diffusers fp32")
    rows = {}
    for name, v in variants.items():
        if not callable(v):
            rows[name] = {"skipped": v}
            continue
        rows[name] = {
            "ms": 1e3 * statistics.median(t[0] for t in times[name]),
            "cpu_s": statistics.median(t[1] for t in times[name]),
            "rel_err": None if ref is None else _rel_err(ref, first[name]),
        }
    return rows


def table(label: str, rows: dict) -> str:
    base = rows.get("diffusers bf16", {}).get("ms")
    best = min((r["ms"] for k, r in rows.items() if k.startswith("diffusers") and "ms" in r), default=None)
    lines = [f"### {label}", "", "| variant | ms (median wall) | CPU s | x diffusers bf16 | x diffusers' best | "
             "rel. err vs diffusers fp32 |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | |")
            continue
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.2e}"
        lines.append(f"| {name} | {r['ms']:.1f} | {r['cpu_s']:.3f} | {base / r['ms']:.2f}x | "
                     f"{best / r['ms']:.2f}x | {err} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, dynamo's eager backend")
    parser.add_argument("--json", help="append one row per workload and variant to this JSON-lines file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._inductor.config.emulate_precision_casts = True  # inductor keeps bf16 roundings (guidance x 1000)
    reps = 1 if args.quick else args.reps
    from fastflow.ops.capability import cpu_bf16

    print(f"threads {args.threads}, median of {reps}, CPU bf16: {cpu_bf16() or 'none'}, torch {torch.__version__}")
    for name in args.workloads:
        label, variants = workload(name, args.quick)
        rows = measure(variants, reps)
        print(table(label, rows) + "\n", flush=True)
        if args.json:  # each workload as it ends
            with open(args.json, "a") as fh:
                for k, r in rows.items():
                    fh.write(json.dumps({"bench": "cpu", "sha": git_sha(), "threads": args.threads, "quick": args.quick,
                                         "workload": name, "label": label, "variant": k, **r}) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
