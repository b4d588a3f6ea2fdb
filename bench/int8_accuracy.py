"""int8 W8A8 accuracy and memory on CPU (issue 33): what `quant="int8"` costs in numbers.

    python bench/int8_accuracy.py block     # FLUX-width 1 double + 1 single block: relative error vs fp32
    python bench/int8_accuracy.py sqnr      # per-layer SQNR on the embedded model, int8 beside FP8
    python bench/int8_accuracy.py memory    # weight bytes and peak RSS of loading a bf16 file vs its int8 file

block: hidden 3072, 24 heads, weights N(0, 0.02) (bench/compile.py's), 1024 image + 128 text tokens;
||y - y_fp32|| / ||y_fp32|| of the whole transformer output for bf16 weights and activations, for
int8 (default Int8Config) on an fp32 model and on a bf16 model.
sqnr: every linear layer the default config quantizes, fed the activations it sees while the fp32
embedded model draws the ten digits (16 steps); 20 log10(||y|| / ||y - y_q||) per layer.
memory: the same FLUX-width model written as a bf16 file and as `fastflow quantize --format int8`;
each loaded (dtype bfloat16) in a fresh process that reports VmHWM (peak RSS) minus its RSS before
the load, and ``fastflow.quant.weight_bytes`` of the loaded model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _config():
    """FLUX.1's width, 1 double + 1 single block, registered so its files load by their shapes."""
    from fastflow.models import configs

    name = "flux-width-1-1"
    if name not in configs.list_models(include_tiny=True):
        configs.register(configs.from_name("flux-dev").replace(name=name, depth=1, depth_single_blocks=1))
    return configs.from_name(name)


def _flux_width(dtype=torch.float32):
    from fastflow.models import Flux

    torch.manual_seed(0)
    model = Flux(_config()).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.02)
    return model.to(dtype)


def _inputs(tokens=1024, txt=128):
    from fastflow.models.flux import make_img_ids

    g = torch.Generator().manual_seed(1)
    side = int(tokens**0.5)
    img = torch.randn(1, tokens, 64, generator=g)
    ctx = torch.randn(1, txt, 4096, generator=g)
    pooled = torch.randn(1, 768, generator=g)
    return (img, ctx, pooled, torch.tensor([0.5]), make_img_ids(side, tokens // side)), {
        "guidance": torch.tensor([3.5])
    }


def _run(model, args, kwargs, dtype):
    cast = [a.to(dtype) if a.is_floating_point() and i < 4 else a for i, a in enumerate(args)]
    with torch.no_grad():
        return model(*cast, guidance=kwargs["guidance"].to(dtype)).float()


def block() -> list[dict]:
    from fastflow.quant import Int8Config, quantize_

    args, kwargs = _inputs()
    ref = _run(_flux_width(), args, kwargs, torch.float32)
    rows = []
    for label, dtype, quant in (
        ("bf16", torch.bfloat16, False),
        ("int8 (fp32 model)", torch.float32, True),
        ("int8 (bf16 model)", torch.bfloat16, True),
    ):
        model = _flux_width(dtype)
        if quant:
            quantize_(model, Int8Config())
        y = _run(model, args, kwargs, dtype)
        rows.append({"variant": label, "relative_error": ((y - ref).norm() / ref.norm()).item()})
        print(f"{label:>20}: relative error vs fp32 {rows[-1]['relative_error']:.4f}", flush=True)
    return rows


def sqnr() -> list[dict]:
    import fastflow
    from fastflow.loading import DEFAULT_MODEL
    from fastflow.quant import Fp8Linear, Int8Config, Int8Linear, quantizable

    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    seen: dict[str, list] = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, []).append((inputs[0].detach().clone(), output.detach().clone()))

        return hook

    names = quantizable(model, Int8Config())
    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for w in words:
        pipe(f"a handwritten {w}", seed=3, output_type="np")
    for h in handles:
        h.remove()
    rows = []
    for name in names:
        layer = model.get_submodule(name)
        row = {"layer": name}
        for kind, q in (("int8", Int8Linear.from_linear(layer)), ("fp8", Fp8Linear.from_linear(layer))):
            err = sig = 0.0
            for x, y in seen[name]:
                err += (q(x) - y).float().pow(2).sum().item()
                sig += y.float().pow(2).sum().item()
            row[kind] = 10 * torch.log10(torch.tensor(sig / max(err, 1e-30))).item()
        rows.append(row)
        print(f"{name:>40}: int8 {row['int8']:6.1f} dB   fp8 {row['fp8']:6.1f} dB", flush=True)
    for kind in ("int8", "fp8"):
        values = sorted(r[kind] for r in rows)
        print(f"{kind}: min {values[0]:.1f} dB, median {values[len(values) // 2]:.1f} dB over {len(values)} layers")
    return rows


_LOAD = """
import json, resource, sys, torch
import fastflow
from fastflow.quant import weight_bytes
sys.path.insert(0, sys.argv[2])
from int8_accuracy import _config
_config()
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = rss("VmRSS:")
model = fastflow.load_transformer(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"peak_rss_over_start": rss("VmHWM:") - before, "rss_after": rss("VmRSS:") - before,
                  "weight_bytes": weight_bytes(model)}))
"""


def memory() -> list[dict]:
    from safetensors.torch import save_file

    from fastflow.loading.writer import quantize_checkpoint
    from fastflow.quant import Int8Config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bf16 = Path(tmp) / "flux-width-bf16.safetensors"
        model = _flux_width(torch.bfloat16)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bf16))
        del model
        int8 = Path(tmp) / "flux-width-int8.safetensors"
        quantize_checkpoint(bf16, int8, Int8Config(), dtype=torch.bfloat16)
        for label, path in (("bf16 file", bf16), ("int8 file", int8)):
            out = subprocess.run(
                [sys.executable, "-c", _LOAD, str(path), str(Path(__file__).parent)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
            row = {"variant": label, "file_bytes": path.stat().st_size, **json.loads(out)}
            rows.append(row)
            print(
                f"{label}: file {row['file_bytes'] / 2**20:.0f} MiB, weight_bytes {row['weight_bytes'] / 2**20:.0f} "
                f"MiB, peak RSS of the load {row['peak_rss_over_start'] / 2**20:.0f} MiB",
                flush=True,
            )
    a, b = rows
    print(
        f"int8 / bf16: weight bytes {b['weight_bytes'] / a['weight_bytes']:.3f}, "
        f"peak RSS {b['peak_rss_over_start'] / a['peak_rss_over_start']:.3f}"
    )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=["block", "sqnr", "memory"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {what: globals()[what]() for what in args.what}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
