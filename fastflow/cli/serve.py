"""``fastflow serve MODEL``: the OpenAI-compatible image server (fastflow/serve, docs/serve.md).
This module only parses the arguments and starts it."""

from __future__ import annotations

from ..errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI images API, batching, a web page)")
    p.add_argument("model", help="an embedded model's name, a pipeline folder or a transformer file")
    p.add_argument("--variant", default=None, help="e.g. flux-kontext-dev, where the keys cannot tell")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=4, help="images per pipeline call (requests are merged)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; more are answered 429")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a call waits to fill its batch")
    p.add_argument("--max-images", type=int, default=8, help="images per request (n)")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="width x height per image (413 beyond)")
    p.add_argument("--max-steps", type=int, default=200, help="num_inference_steps per request")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body size limit (413 beyond)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request from its arrival (504)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or FASTFLOW_API_KEY)")
    p.add_argument("--compile", action="store_true", help="torch.compile, warmed before /health says ready")
    p.add_argument("--quant", choices=("fp8", "int8", "none"), default=None, help="as fastflow.load(quant=)")
    p.add_argument("--cache", default=None, metavar="POLICY", help="default feature-cache policy of requests")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA requests may name")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="a folder requests may name LoRAs under")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--parallel", default=None, metavar="SPEC",
                   help="under torchrun: one server per context-parallel group, e.g. ulysses=2,ring=2 or cfg=2 "
                   "(rank 0 serves HTTP; docs/serve.md)")  # fmt: skip
    p.add_argument("--ray", action="store_true", help="scale out on Ray Serve (pip install 'fastflow[ray]')")
    p.add_argument("--replicas", type=int, default=None, help="with --ray: replicas, one per GPU (default 1)")
    p.add_argument("--ray-address", default=None, help="with --ray: a running cluster (default $RAY_ADDRESS or local)")
    p.set_defaults(func=run)


def parse_loras(specs: list[str]) -> dict[str, str]:
    loras = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora {spec}: use NAME=PATH (requests then name the LoRA)")
        if name in loras:
            raise InputError(f"--lora {name}: the name is given twice")
        loras[name] = path
    return loras


def run(args) -> int:
    import os

    from ..serve import ServeConfig
    from ..serve import run as serve
    from ..serve.ranks import follow, parallel_sizes

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("fastflow serve needs FastAPI and uvicorn: pip install 'fastflow[serve]'") from None
    config = ServeConfig(
        model=args.model,
        variant=args.variant,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_window_ms=args.batch_window_ms,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        max_steps=args.max_steps,
        max_body_bytes=int(args.max_body_mb * 2**20),
        timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get("FASTFLOW_API_KEY") or None,
        compile=args.compile,
        quant=args.quant,
        cache=args.cache,
        loras=parse_loras(args.lora),
        lora_dir=args.lora_dir,
        device=args.device,
        dtype=args.dtype,
        log_level=args.log_level,
        parallel=args.parallel,
    )
    sizes = parallel_sizes(args.parallel)  # before anything loads
    if sizes is not None and args.ray:
        raise InputError("--parallel runs one server per torchrun group; --ray scales out replicas: pick one")
    if sizes is not None and int(os.environ.get("RANK", "0")) != 0:
        return follow(config, sizes)  # the other ranks of the group: rank 0 serves
    if args.ray:
        from ..serve.ray_app import run as serve_on_ray

        serve_on_ray(config, args.replicas or 1, address=args.ray_address)
        return 0
    if args.replicas is not None or args.ray_address is not None:
        raise InputError("--replicas and --ray-address scale out on Ray Serve: add --ray")
    serve(config)
    return 0
