"""Servers for tests/serve: an in-process uvicorn on a thread (``serving``) over loopback, on a
port the OS picks (the socket is bound before the server starts), stopped and joined at the end."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

MODEL = "fastflow-tiny-digits"


@pytest.fixture(scope="module")
def pipe():
    import fastflow

    return fastflow.load(MODEL)


@contextlib.contextmanager
def serving(pipe, wait_ready: bool = True, **settings):
    """A running server of ``pipe`` with ServeConfig(**settings): yields (base URL, app)."""
    import uvicorn

    from fastflow.serve import ServeConfig, create_app

    app = create_app(ServeConfig(model=MODEL, **settings), pipe)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(base + "/health", timeout=5)
                if r.status_code == 200 or (not wait_ready and r.status_code == 503):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up in 60 s"
            time.sleep(0.05)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server thread did not stop"


def png_pixels(b64: str):
    """A b64_json PNG's pixels (uint8 [H, W, 3])."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def reference(pipe, prompt: str, seed: int, **kwargs):
    """The in-process image of ``prompt`` / ``seed``: uint8 pixels, as PNG bytes decode to."""
    import numpy as np

    return np.asarray(pipe(prompt, seed=seed, progress=False, **kwargs).images[0])


def metric(text: str, name: str) -> float:
    """The value of one Prometheus sample line (``name`` with its labels, exactly)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@contextlib.contextmanager
def gated(app):
    """Holds the worker at the start of its next pipeline call until the gate opens: yields
    (gate, entered), two threading.Events. Lets a test fill the queue deterministically."""
    engine = app.state.server.engine
    gate, entered = threading.Event(), threading.Event()
    original = engine.apply_loras

    def wait_then_apply(pipe, scales):
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        original(pipe, scales)

    engine.apply_loras = wait_then_apply
    try:
        yield gate, entered
    finally:
        gate.set()
        engine.apply_loras = original


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
