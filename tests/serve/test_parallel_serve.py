"""``fastflow serve`` under torchrun (serve/ranks.py): two CPU ranks (gloo) split the embedded model
(Ring attention); rank 0 serves HTTP and sends every call to rank 1. Concurrent requests (batched) answer
the in-process images of their seeds; an edit carries its image to the other rank; SIGTERM to the
ranks finishes the work and every process exits 0 (so torchrun does too)."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest

from .conftest import MODEL, httpx, metric, png_pixels, reference
from .test_shutdown import _free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _close(a, b) -> bool:
    """Pixels equal to one level of 255: the split computes the same numbers to ~1e-6."""
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1


def test_a_torchrun_group_serves_the_in_process_images_and_stops_cleanly(tmp_path, pipe):
    port = _free_port()
    env = {**os.environ, "FASTFLOW_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    log_path = tmp_path / "serve.log"
    log = open(log_path, "wb")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "fastflow", "serve", MODEL, "--port", str(port), "--parallel", "ring=2",
               "--max-batch", "4", "--batch-window-ms", "200", "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the group did not come up:\n" + log_path.read_text()
            time.sleep(0.3)
        asks = [{"prompt": "a 3", "seed": 5}, {"prompt": "a 7", "seed": 8, "n": 2}, {"prompt": "a 1", "seed": 9}]
        answers = [None] * len(asks)

        def client(i):
            answers[i] = httpx.post(base + "/v1/images/generations", json=asks[i], timeout=180)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(200)
        for ask, answer in zip(asks, answers, strict=True):
            assert answer is not None and answer.status_code == 200, answer and answer.text
            for k, item in enumerate(answer.json()["data"]):
                assert item["seed"] == ask["seed"] + k
                assert _close(png_pixels(item["b64_json"]), reference(pipe, ask["prompt"], item["seed"]))
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert metric(metrics, "fastflow_batch_size_sum") == 4  # every image went through one of rank 0's calls
        assert 1 <= metric(metrics, "fastflow_batch_size_count") <= 3
        # an edit: its image travels to rank 1 as PNG
        start = pipe("a 2", seed=3, progress=False).images[0]
        buffer = io.BytesIO()
        start.save(buffer, format="PNG")
        form = {"prompt": "a 6", "seed": "4", "strength": "0.7"}
        edit = httpx.post(base + "/v1/images/edits", data=form, files={"image": ("a.png", buffer.getvalue())},
                          timeout=180)  # fmt: skip
        assert edit.status_code == 200, edit.text
        from PIL import Image

        sent = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        want = reference(pipe, "a 6", 4, image=sent, strength=0.7)
        assert _close(png_pixels(edit.json()["data"][0]["b64_json"]), want)
        assert base64.b64decode(edit.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        for rank in ranks:  # every rank gets SIGTERM (torchrun's own SIGTERM would make torchrun exit 1)
            rank.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log_path.read_text()  # torchrun: every rank exited 0
    finally:
        if proc.poll() is None:  # torchrun starts each rank in a session of its own: kill them too
            for rank in psutil.Process(proc.pid).children(recursive=True):
                rank.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()


def test_parallel_needs_torchrun_and_no_data_split(monkeypatch):
    from fastflow.errors import InputError
    from fastflow.serve.ranks import parallel_sizes

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(InputError, match="torchrun --nproc-per-node 2"):
        parallel_sizes("ulysses=2")
    assert parallel_sizes(None) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="without --parallel"):
        parallel_sizes(None)
    with pytest.raises(InputError, match="one replica per GPU"):
        parallel_sizes("data=2")
