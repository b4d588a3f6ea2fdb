"""Scale-out on Ray Serve: the same HTTP API (``create_app``'s routes) served by N replicas, one
per GPU where the cluster has GPUs (``num_cpus`` per replica otherwise), each replica with its own
pipeline and engine (queue, dynamic batching). Ray's HTTP proxy spreads the requests over them.

``run(config, replicas)`` (what ``fastflow serve MODEL --ray --replicas N`` calls) starts or joins
a Ray cluster and serves until SIGINT / SIGTERM; ``build(config, replicas)`` is the bound Ray Serve
application (``serve.run(build(...))``); ``from_args`` is the builder ``serve run`` takes::

    serve run fastflow.serve.ray_app:from_args model=fastflow-tiny-digits replicas=2

Every answer carries the header ``x-fastflow-replica`` (the Ray Serve replica that made it); each
replica's ``/metrics`` counts its own work. Ray (``pip install 'fastflow[ray]'``) is imported only
here, inside the functions, never by ``import fastflow``."""

from __future__ import annotations

import dataclasses
import logging
import os

from ..errors import InputError
from .config import ServeConfig

log = logging.getLogger("fastflow.serve")

REPLICA_HEADER = "x-fastflow-replica"
APP_NAME = "fastflow"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("fastflow serve --ray needs Ray Serve: pip install 'fastflow[ray]'") from None
    return ray, serve


def replica_options(config: ServeConfig, gpus: float | None = None, cpus_per_replica: float = 1.0) -> dict:
    """``ray_actor_options`` of one replica: one GPU each where GPUs are used, else
    ``cpus_per_replica`` CPUs. ``gpus``: the GPUs the cluster has (None: asks the running Ray
    cluster, or torch where none is connected yet); ``config.device == "cpu"`` uses no GPU."""
    if not cpus_per_replica > 0:
        raise InputError(f"cpus_per_replica must be positive, got {cpus_per_replica!r}")
    if config.device is not None and config.device.startswith("cpu"):
        gpus = 0
    elif config.device is not None and config.device.startswith("cuda:") and config.device != "cuda:0":
        raise InputError(f"--ray: each replica gets one GPU of its own (seen as cuda:0); "
                         f"use --device cuda or leave it out, not {config.device}")  # fmt: skip
    if gpus is None:
        ray, _ = _ray()
        if ray.is_initialized():
            gpus = ray.cluster_resources().get("GPU", 0)
        else:
            import torch

            gpus = torch.cuda.device_count()
    if gpus:
        return {"num_gpus": 1, "num_cpus": cpus_per_replica}
    return {"num_cpus": cpus_per_replica}


class _ReplicaHeader:
    """ASGI middleware: adds ``x-fastflow-replica: <id>`` to every HTTP answer (streamed ones too)."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def _replica_id() -> str:
    try:
        from ray import serve

        context = serve.get_replica_context()
        return str(getattr(context.replica_id, "unique_id", None) or context.replica_tag)
    except Exception:  # outside a replica (tests of the app builder)
        return f"pid{os.getpid()}"


def replica_app(settings: dict, threads: int | None = None):
    """One replica's app: ``create_app`` of ``ServeConfig(**settings)`` with a pipeline of its own,
    loaded here (Ray counts the replica as started once its model is loaded), and the replica
    header. ``threads``: torch's CPU threads (a CPU replica's share of the machine)."""
    import torch

    from .app import create_app
    from .model import load_pipeline

    if threads:
        torch.set_num_threads(max(1, int(threads)))
    config = ServeConfig(**settings)
    pipe = load_pipeline(config)
    app = create_app(config, pipe)
    app.add_middleware(_ReplicaHeader, replica=_replica_id())
    return app


def build(config: ServeConfig, replicas: int, *, gpus: float | None = None, cpus_per_replica: float = 1.0):
    """The Ray Serve application: ``replicas`` replicas of ``create_app(config)``. Bind-time only:
    the model loads in each replica when ``serve.run`` deploys it."""
    _, serve = _ray()
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise InputError(f"--replicas must be a positive integer, got {replicas!r}")
    options = replica_options(config, gpus, cpus_per_replica)
    settings = dataclasses.asdict(config)
    threads = None if options.get("num_gpus") else options["num_cpus"]

    def build_asgi_app():
        return replica_app(settings, threads)

    # the engine answers back-pressure (429): Ray lets through what its queue and a batch hold
    ongoing = config.max_queue + config.max_batch

    @serve.deployment(name="FastflowServe", num_replicas=replicas, ray_actor_options=options,
                      max_ongoing_requests=ongoing, graceful_shutdown_timeout_s=config.timeout_s,
                      health_check_period_s=10)  # fmt: skip
    @serve.ingress(build_asgi_app)
    class FastflowServe:
        def check_health(self):
            engine = self.app.state.server.engine  # self.app: Ray's ASGI wrapper's app
            if engine.failed:
                raise RuntimeError(f"fastflow serve: the model failed to load: {engine.failed}")

    return FastflowServe.bind()


def from_args(args: dict):
    """``serve run fastflow.serve.ray_app:from_args model=NAME replicas=N [max_batch=4 ...]``:
    the ServeConfig fields given as strings (numbers converted by the field's type)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    cpus = float(args.pop("cpus_per_replica", 1.0))
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    settings = {}
    for key, value in args.items():
        if key not in fields or key in ("loras",):
            raise InputError(f"serve run fastflow.serve.ray_app:from_args: unknown argument {key!r}; "
                             f"use ServeConfig's fields ({', '.join(f for f in fields if f != 'loras')}) "
                             "and replicas, cpus_per_replica")  # fmt: skip
        kind = str(fields[key].type)
        if isinstance(value, str) and kind.startswith("int"):
            value = int(value)
        elif isinstance(value, str) and kind.startswith("float"):
            value = float(value)
        elif isinstance(value, str) and kind == "bool":
            value = value.lower() in ("1", "true", "yes")
        settings[key] = value
    return build(ServeConfig(**settings), replicas, cpus_per_replica=cpus)


def run(config: ServeConfig, replicas: int, *, address: str | None = None, cpus_per_replica: float = 1.0) -> None:
    """Serves ``config`` on Ray Serve with ``replicas`` replicas at http://config.host:config.port
    until SIGINT / SIGTERM, then shuts Serve down (the replicas finish their in-flight requests).
    ``address``: a running Ray cluster (``auto`` / ``ray://...``; default $RAY_ADDRESS, or a local
    instance started here)."""
    import signal
    import threading

    ray, serve = _ray()
    if not config.loopback and config.api_key is None:
        log.warning("serving on %s WITHOUT an API key: pass --api-key (and put TLS in front of it)", config.host)
    ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        logging_config = {"log_level": config.log_level.upper()}
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=logging_config)
        app = build(config, replicas, cpus_per_replica=cpus_per_replica)
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
        log.warning("fastflow serve: %d Ray Serve replicas of %s at http://%s:%d", replicas, config.model,
                    config.host, config.port)  # fmt: skip
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
