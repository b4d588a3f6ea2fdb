"""``fastflow smoke``: a tiny random-weight FLUX saved, detected, loaded and run; the loaded
model must match the saved one exactly."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("smoke", help="save, load and run a tiny random-weight FLUX model")
    p.add_argument("--variant", default="flux-tiny-dev")
    p.add_argument("-H", "--height", type=int, default=256)
    p.add_argument("-W", "--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    """Round-trip a tiny random-weight FLUX through save -> detect -> load -> forward."""
    from safetensors.torch import save_file

    from ..loading import inspect_checkpoint, load_transformer
    from ..models import Flux, from_name
    from ..models.flux import make_img_ids

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
