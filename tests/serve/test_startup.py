"""Start-up: /health answers 503 {"status": "loading"} (and requests 503) until the model is
loaded and, with --compile, compiled and warmed by one generation; then 200 {"status": "ok"}."""

from __future__ import annotations

import threading

import fastflow.compile
import fastflow.serve.app
from fastflow.serve.model import FLOW_SAMPLERS

from .conftest import httpx, serving, wait_for


def test_health_loading_until_loaded(pipe, monkeypatch):
    release = threading.Event()

    def slow_load(config):
        assert release.wait(60)
        return pipe

    monkeypatch.setattr(fastflow.serve.app, "load_pipeline", slow_load)
    with serving(None, wait_ready=False) as (base, _):
        r = httpx.get(base + "/health", timeout=10)
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "a 1"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and "Retry-After" in r.headers
        release.set()
        wait_for(lambda: httpx.get(base + "/health", timeout=10).status_code == 200, "ready")
        assert httpx.post(base + "/v1/images/generations", json={"prompt": "a 1"}, timeout=60).status_code == 200


def test_compile_warms_before_ready(pipe, monkeypatch):
    release, calls, forwards = threading.Event(), [], []

    def fake_accelerate(p, compile=True, **kwargs):
        calls.append((p, compile, kwargs))
        assert release.wait(60)
        return p

    monkeypatch.setattr(fastflow.compile, "accelerate", fake_accelerate)
    hook = pipe.transformer.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with serving(pipe, wait_ready=False, compile=True) as (base, _):
            wait_for(lambda: calls, "accelerate to be called")
            assert httpx.get(base + "/health", timeout=10).json() == {"status": "loading"}
            release.set()
            wait_for(lambda: httpx.get(base + "/health", timeout=10).status_code == 200, "ready")
            assert forwards, "no warm-up generation ran before /health said ok"
    finally:
        hook.remove()
    assert calls[0][0] is pipe and calls[0][1] is True


def test_failed_load_is_reported(monkeypatch):
    def broken(config):
        raise OSError("disk on fire")

    monkeypatch.setattr(fastflow.serve.app, "load_pipeline", broken)
    with serving(None, wait_ready=False) as (base, _):
        wait_for(lambda: httpx.get(base + "/health", timeout=10).json()["status"] == "error", "the error")
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "a 1"}, timeout=10)
        assert r.status_code == 503 and "disk on fire" in r.json()["error"]["message"]


def test_flow_samplers_are_the_solvers():
    from fastflow.samplers.solvers import SOLVERS

    assert sorted(FLOW_SAMPLERS) == sorted(SOLVERS)
