"""Quality yardstick on the embedded digits model: FD-digits and prompt accuracy.

(a) FD-digits: 50 images per digit (500, fixed seeds) are mapped to 8x8 grey values in [0, 1] like
    the dataset, projected with a 20-component PCA fitted on all 1,797 real digits, and compared
    with the real digits by the Frechet distance between the two Gaussians. The floor is the same
    distance between two random halves of the real digits.
(b) Prompt accuracy: a classifier trained on 75% of the dataset (its held-out accuracy is reported)
    labels the generated images; accuracy = share labelled with the prompted digit. It saturates
    easily (a blurry class mean is still classified right), so FD-digits is the primary number.

Every pipeline option can be varied, so later work reports its quality cost here:

    python bench/quality.py                               # default settings
    python bench/quality.py --steps 1 2 4 8 16 --json q.json
    python bench/quality.py --sampler heun --cfg 2 --pipeline-arg auto_resize=false
    python bench/quality.py --quant fp8                   # FP8 with the default skip list
    python bench/quality.py --quant fp8 --fp8-study       # which layers to keep, activation scaling
    python bench/quality.py --quant none int8             # int8 W8A8 (default Int8Config) beside unquantized
    python bench/quality.py --model fastflow-tiny-digits fastflow-tiny-digits-unet   # the UNet model beside

``--cfg`` is the FLUX model's true-CFG scale and the UNet model's (SDXL) guidance_scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastflow.evaluation import PER_DIGIT, Yardstick, generate


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    import fastflow
    from fastflow.loading import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", nargs="+", default=[str(DEFAULT_MODEL)], help="one row set per model (a name or path)"
    )
    parser.add_argument("--steps", type=int, nargs="*", default=[None], help="one row per value (default: the model's)")
    parser.add_argument("--sampler", default=None, choices=["euler", "heun", "dpmpp_2m"])
    parser.add_argument("--cfg", type=float, default=None, help="true CFG scale (default: the model's)")
    parser.add_argument("--per-digit", type=int, default=PER_DIGIT)
    parser.add_argument(
        "--pipeline-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further pipeline keyword (e.g. a caching policy), repeatable",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="append the rows to this JSON-lines file")
    parser.add_argument(
        "--quant",
        default=["none"],
        nargs="+",
        choices=["none", "fp8", "int8"],
        help="one row set per value: fp8 / int8, the default Fp8Config / Int8Config",
    )
    parser.add_argument(
        "--fp8-study",
        action="store_true",
        help="rows for the unquantized model and FP8 with each choice of kept layers and activation scaling",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    stick = Yardstick()
    extra = dict(kv.split("=", 1) for kv in args.pipeline_arg)
    extra = {k: _value(v) for k, v in extra.items()}
    rows = []
    print(
        f"classifier held-out accuracy {stick.classifier_accuracy:.3f}; FD floor (real half vs half) "
        f"{stick.fd_floor:.3f}"
    )
    print(
        f"{'model':>26} {'quant':>44} {'steps':>5} {'sampler':>9} {'cfg':>5} {'FD-digits':>10} {'accuracy':>9} "
        f"{'seconds':>8}"
    )
    for model in args.model:
        for label, quant, calibrate in _quant_settings(args):
            pipe = fastflow.load(model, device="cpu", dtype=dtype, quant=quant)
            pipe.set_progress_bar_config(disable=True)
            if calibrate:
                _calibrate(pipe, args.per_digit)
            rows += _rows(pipe, stick, args, extra, label, model)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # _ops_common, also when imported by tests
    from _ops_common import git_sha, write_json

    write_json([dict(row, git=git_sha(), torch=torch.__version__) for row in rows], args.json)
    return 0


def _quant_settings(args):
    """(label, quant= for fastflow.load, calibrate static scales first)."""
    from fastflow.quant import DEFAULT_SKIP_GROUPS, Fp8Config, Int8Config, skip_patterns

    if not args.fp8_study:
        labels = {"none": "none", "fp8": Fp8Config().describe(), "int8": Int8Config().describe()}
        return [(labels[quant], quant, False) for quant in args.quant]
    settings = [("none", "none", False)]
    for keep in ((), ("embedders",), ("embedders", "final"), ("embedders", "final", "modulation")):
        config = Fp8Config(skip=skip_patterns(*keep))
        settings.append((f"fp8 keep {'+'.join(keep) or 'nothing'}", config, False))
    config = Fp8Config(activation="per-tensor", skip=skip_patterns(*DEFAULT_SKIP_GROUPS))
    settings.append(("fp8 per-tensor activations", config, False))
    settings.append(("fp8 static activations (calibrated)", Fp8Config(), True))
    config = Fp8Config(weight="per-tensor", skip=skip_patterns(*DEFAULT_SKIP_GROUPS))
    settings.append(("fp8 per-tensor weights", config, False))
    return settings


def _calibrate(pipe, per_digit: int) -> None:
    """Static activation scales from a calibration run on other seeds than the scored images."""
    from fastflow.quant import calibrate_

    calibrate_(pipe.transformer, lambda: generate(pipe, max(1, per_digit // 10), seed_offset=10_000))


def _rows(pipe, stick, args, extra, label, model) -> list[dict]:
    rows = []
    flux = "true_cfg" in pipe.defaults  # FLUX's true CFG; the UNet (SDXL) model's guidance_scale
    scale = "true_cfg_scale" if flux else "guidance_scale"
    for steps in args.steps:
        t0 = time.perf_counter()
        kwargs = {"num_inference_steps": steps, "sampler": args.sampler, scale: args.cfg, **extra}
        generated, labels = generate(pipe, args.per_digit, **kwargs)
        row = {
            "quant": label,
            "steps": steps or pipe.defaults["steps"],
            "sampler": args.sampler or pipe.defaults["sampler"],
            "cfg": args.cfg if args.cfg is not None else pipe.defaults["true_cfg" if flux else "guidance"],
            "extra": extra,
            **stick.score(generated, labels),
            "seconds": time.perf_counter() - t0,
            "images": len(labels),
            "classifier_accuracy": stick.classifier_accuracy,
            "fd_floor": stick.fd_floor,
            "model": model,
            "model_name": pipe.config.name,
        }
        rows.append(row)
        print(
            f"{pipe.config.name:>26} {label:>44} {row['steps']:>5} {row['sampler']:>9} {row['cfg']:>5} "
            f"{row['fd_digits']:>10.3f} {row['prompt_accuracy']:>9.3f} {row['seconds']:>8.1f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    sys.exit(main())
