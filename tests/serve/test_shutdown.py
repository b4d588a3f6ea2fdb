"""``fastflow serve`` as a real process over loopback: SIGTERM while a request runs stops
accepting new work, finishes that request, and exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from .conftest import MODEL, httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_finishes_in_flight_request_and_exits_0(tmp_path):
    port = _free_port()
    env = {**os.environ, "FASTFLOW_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "fastflow", "serve", MODEL, "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        started, events = threading.Event(), []

        def client():
            ask = {"prompt": "a 4", "seed": 11, "num_inference_steps": 150, "stream": True}
            with httpx.stream("POST", base + "/v1/images/generations", json=ask, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        events.append(line.removeprefix("event: "))
                        started.set()
                    elif line.startswith("data: ") and events[-1] != "progress":
                        events.append(json.loads(line.removeprefix("data: ")))

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        assert started.wait(60), "no progress event"
        proc.send_signal(signal.SIGTERM)
        at_signal = events.count("progress")
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()
        thread.join(30)
        assert not thread.is_alive()
        assert events[-2] == "completed", events[-3:]
        assert events[-1]["data"][0]["seed"] == 11 and events.count("progress") == 150
        assert at_signal < 150, "the request had finished before SIGTERM: nothing was in flight"
        try:  # nothing listens any more
            httpx.get(base + "/health", timeout=5)
            raise AssertionError("the server still answers after SIGTERM")
        except httpx.TransportError:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
