"""``fastflow serve``: an OpenAI-compatible image server (docs/serve.md).

``ServeConfig`` (the settings), ``create_app(config, pipe=None)`` (the FastAPI app) and
``run(config)`` (uvicorn, with a graceful SIGTERM: no new work, the queued and running requests
finish, exit 0). FastAPI and uvicorn (``pip install fastflow[serve]``) are imported only by
``create_app`` and ``run``."""

from __future__ import annotations

import logging
import signal
import warnings

from .config import ServeConfig, is_loopback

__all__ = ["ServeConfig", "create_app", "run"]

log = logging.getLogger("fastflow.serve")


def create_app(config: ServeConfig, pipe=None):
    """The FastAPI app serving ``config`` (``pipe``: a built pipeline to serve instead of loading)."""
    from .app import create_app as _create

    return _create(config, pipe)


def run(config: ServeConfig, pipe=None) -> None:
    """Serves ``config`` with uvicorn until SIGINT / SIGTERM. Then: new requests get 503, the
    listening socket closes, queued and running requests finish, and run returns."""
    import uvicorn

    if not is_loopback(config.host) and config.api_key is None:
        warnings.warn(
            f"serving on {config.host} WITHOUT an API key: anyone who can reach this address can run the model; "
            "pass --api-key (and put TLS in front of it)",
            UserWarning,
            stacklevel=2,
        )
    app = create_app(config, pipe)
    engine = app.state.server.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_accepting()  # requests still arriving on open connections: 503
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)  # uvicorn re-raises these after serving
            if sig == signal.SIGTERM and captured is not None:  # a graceful stop, done: exit 0, not 143
                captured[:] = [s for s in captured if s != signal.SIGTERM]

    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                               timeout_graceful_shutdown=None, server_header=False)  # fmt: skip
    Server(uv_config).run()
