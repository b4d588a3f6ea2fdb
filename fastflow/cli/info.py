"""``fastflow info``: a checkpoint's family, variant, dtype and size from its header (and, for a
pipeline folder, every component's size)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint (family, variant, dtype, size) from its header")
    p.add_argument("path", help="a .safetensors file, a diffusers folder or an embedded model's name")
    p.add_argument("--variant", default=None, help="resolve variants the keys cannot tell apart")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import inspect_checkpoint
    from ..loading.source import resolve_model

    folder = Path(resolve_model(args.path))  # every name --model takes (fastflow-tiny-digits)
    print(inspect_checkpoint(folder, variant=args.variant).summary())
    if folder.is_dir():  # a pipeline folder: every component, with its size
        from ..loading.loader import human_bytes

        parts = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
        if parts:
            print("components:")
        for part in parts:
            files = sorted(part.glob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            print(f"  {part.name + '/':<17} {human_bytes(size):>10} in {len(files)} file(s)")
    return 0
