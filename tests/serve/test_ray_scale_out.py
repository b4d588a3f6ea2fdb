"""Scale-out on Ray Serve (fastflow/serve/ray_app.py): a local Ray instance, TWO CPU replicas of the
embedded model behind Ray's HTTP proxy on loopback; the answers are the in-process images of their
seeds (PNG pixels, bit for bit) and both replicas answer (the x-fastflow-replica header, and each
replica's own /metrics). Serve and Ray are shut down whatever happens."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import numpy as np
import pytest

from .conftest import MODEL, httpx, metric, png_pixels, reference

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_base():
    """http://127.0.0.1:PORT of a 2-replica deployment on a local 2-CPU Ray instance."""
    from fastflow.serve import ServeConfig
    from fastflow.serve.ray_app import build

    port = _free_port()
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        config = ServeConfig(model=MODEL, port=port, max_batch=4, batch_window_ms=200, device="cpu")
        deployed = []  # serve.run waits for the replicas (their models loaded): bounded from here
        deploy = threading.Thread(
            target=lambda: deployed.append(serve.run(build(config, 2), name="ff-test")), daemon=True
        )
        deploy.start()
        deploy.join(120)
        assert deployed, "the two replicas were not deployed in 120 s (or the deployment failed: see the log above)"
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while httpx.get(base + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the replicas did not become ready in 60 s"
            time.sleep(0.2)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_two_replicas_answer_in_process_images(ray_base, pipe):
    asks = [(f"a {i % 10}", 500 + 31 * i) for i in range(8)]

    def ask(prompt_seed):
        prompt, seed = prompt_seed
        r = httpx.post(ray_base + "/v1/images/generations", json={"prompt": prompt, "seed": seed}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-fastflow-replica"], r.json()

    replicas = set()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for _ in range(5):  # the proxy picks replicas by their queues: a few rounds see both
            answers = list(pool.map(ask, asks))
            replicas |= {replica for replica, _ in answers}
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, f"one replica answered everything: {replicas}"
    for (prompt, seed), (_, body) in zip(asks, answers, strict=True):
        assert body["data"][0]["seed"] == seed and body["model"] == MODEL
        assert np.array_equal(png_pixels(body["data"][0]["b64_json"]), reference(pipe, prompt, seed)), (prompt, seed)


def test_each_replica_has_its_own_engine(ray_base):
    """/metrics answers from one replica at a time: each replica counts at least the images it answered."""

    def ask(seed):
        r = httpx.post(ray_base + "/v1/images/generations", json={"prompt": "a 1", "seed": seed}, timeout=60)
        assert r.status_code == 200, r.text
        return r.headers["x-fastflow-replica"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answered = list(pool.map(ask, range(8)))
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        r = httpx.get(ray_base + "/metrics", timeout=10)
        assert r.status_code == 200
        seen[r.headers["x-fastflow-replica"]] = metric(r.text, "fastflow_images_total")
    assert len(seen) == 2, seen
    for replica in set(answered):
        assert seen[replica] >= answered.count(replica), (seen, answered)


def test_bad_request_is_the_same_json_error(ray_base):
    r = httpx.post(ray_base + "/v1/images/generations", json={"n": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"], r.text
