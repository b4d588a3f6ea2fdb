"""``fastflow quantize``: an FP8 or int8 copy of a transformer checkpoint (loads back bit-identically)."""

from __future__ import annotations

from .common import DTYPES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="write an FP8 or int8 copy of a transformer checkpoint (loads back bit-identically)"
    )
    p.add_argument("input", help="a transformer .safetensors file or diffusers folder")
    p.add_argument("output", help="the .safetensors file to write (never overwritten)")
    p.add_argument(
        "--format",
        default="fp8",
        choices=["fp8", "int8"],
        help="fp8: e4m3 weights with fp32 scales (GPUs with sm_89+); int8: int8 weights with a scale per "
        "output channel, W8A8 (CPUs, GPUs with sm_80+)",
    )
    p.add_argument(
        "--weight", default="per-channel", choices=["per-channel", "per-tensor"], help="weight scales (fp8 only)"
    )
    p.add_argument(
        "--keep",
        default=None,
        help="layer groups kept in --dtype, comma-separated: embedders, final, modulation, or none "
        "(default: embedders,final)",
    )
    p.add_argument("--variant", default=None, help="resolve variants the keys cannot tell apart")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the layers kept")
    p.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import InputError
    from ..loading.writer import quantize_checkpoint
    from ..quant import DEFAULT_SKIP_GROUPS, Fp8Config, Int8Config, skip_patterns

    groups = DEFAULT_SKIP_GROUPS if args.keep is None else tuple(g for g in args.keep.split(",") if g and g != "none")
    if args.format == "int8":
        if args.weight != "per-channel":
            raise InputError("--format int8 has per-channel weight scales only: drop --weight per-tensor")
        config = Int8Config(skip=skip_patterns(*groups))
    else:
        config = Fp8Config(weight=args.weight, skip=skip_patterns(*groups))
    done = quantize_checkpoint(args.input, args.output, config, variant=args.variant, dtype=DTYPES[args.dtype])
    kind = "int8" if args.format == "int8" else "FP8"
    print(
        f"wrote {done['path']}: {done['variant']}, {done['layers']} {kind} layers, "
        f"{done['bytes'] / 2**30:.2f} GiB ({config.describe()}, kept in {args.dtype}: {', '.join(groups) or 'nothing'})"
    )
    return 0
