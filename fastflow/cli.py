"""The ``fastflow`` command: ``info <checkpoint>``, ``smoke`` and ``doctor``.

Errors from bad input print one line and exit with status 2; ``generate`` arrives with the
pipelines.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import __version__
from .errors import FastflowError


def _cmd_info(args) -> int:
    from .loading import inspect_checkpoint

    print(inspect_checkpoint(args.path, variant=args.variant).summary())
    return 0


def _cmd_smoke(args) -> int:
    """Round-trip a tiny random-weight FLUX through save -> detect -> load -> forward."""
    from safetensors.torch import save_file

    from .loading import inspect_checkpoint, load_transformer
    from .models import Flux, from_name
    from .models.flux import make_img_ids

    cfg = from_name(args.variant)
    torch.manual_seed(args.seed)
    model = Flux(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.name}.safetensors"
        save_file(model.state_dict(), str(path), metadata={"fastflow.variant": cfg.name})
        print(inspect_checkpoint(path).summary())
        t0 = time.perf_counter()
        loaded = load_transformer(path, dtype=torch.float32)
        t_load = time.perf_counter() - t0
    h, w, n_txt = args.height // 16, args.width // 16, 16
    img = torch.randn(1, h * w, cfg.in_channels)
    txt, y = torch.randn(1, n_txt, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim)
    guidance = torch.full((1,), 3.5) if cfg.guidance_embed else None
    with torch.no_grad():
        t0 = time.perf_counter()
        out = loaded(img, txt, y, torch.full((1,), 0.5), make_img_ids(h, w), guidance=guidance)
        t_fwd = time.perf_counter() - t0
        ref = model(img, txt, y, torch.full((1,), 0.5), make_img_ids(h, w), guidance=guidance)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(
        f"load {t_load * 1e3:.1f} ms, forward on {h * w} image tokens {t_fwd * 1e3:.1f} ms, "
        f"loaded-vs-original max relative difference {err:.1e}"
    )
    if err != 0.0:
        print("smoke test FAILED: the loaded model differs from the saved one", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


def _cmd_doctor(args) -> int:
    import platform

    from . import ops

    print(f"fastflow {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (GPU kernels unavailable; reference ops will run)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} sm_{cap[0]}{cap[1]}")
    else:
        print("CUDA: no GPU visible; every op runs its plain-torch reference")
    print(f"op backend: {ops.get_backend()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description="Fast FLUX.1 / SD3 inference")
    parser.add_argument("--version", action="version", version=f"fastflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="describe a checkpoint (family, variant, dtype, size) from its header")
    p.add_argument("path", help="a .safetensors file or a diffusers folder")
    p.add_argument("--variant", default=None, help="resolve variants the keys cannot tell apart")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("smoke", help="save, load and run a tiny random-weight FLUX model")
    p.add_argument("--variant", default="flux-tiny-dev")
    p.add_argument("-H", "--height", type=int, default=256)
    p.add_argument("-W", "--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_smoke)

    p = sub.add_parser("doctor", help="report torch / triton / GPU and which kernels will run")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastflowError as e:
        print(f"fastflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
