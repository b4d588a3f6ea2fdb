"""fastflow/serve/ray_app.py without a Ray cluster: `import fastflow` (and fastflow.serve) does not
import Ray; a replica's resources (one GPU each where there are GPUs, CPUs otherwise); the replica
header middleware; `serve run` builder arguments and the CLI flags checked before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastflow.errors import InputError
from fastflow.serve import ServeConfig

from .conftest import MODEL, httpx


def test_import_fastflow_does_not_import_ray():
    code = "import sys, fastflow, fastflow.serve, fastflow.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_replica_options_one_gpu_each_or_cpus():
    from fastflow.serve.ray_app import replica_options

    config = ServeConfig(model=MODEL)
    assert replica_options(config, gpus=4) == {"num_gpus": 1, "num_cpus": 1.0}
    assert replica_options(config, gpus=0, cpus_per_replica=2) == {"num_cpus": 2}
    assert replica_options(ServeConfig(model=MODEL, device="cpu"), gpus=8) == {"num_cpus": 1.0}
    with pytest.raises(InputError, match="cuda:0"):
        replica_options(ServeConfig(model=MODEL, device="cuda:1"), gpus=8)
    with pytest.raises(InputError, match="positive"):
        replica_options(config, gpus=0, cpus_per_replica=0)


def test_replica_header_on_plain_and_streamed_answers(pipe):
    """The middleware a replica's app gets: x-fastflow-replica on JSON and SSE answers, bodies untouched."""
    from fastflow.serve import create_app
    from fastflow.serve.ray_app import REPLICA_HEADER, _ReplicaHeader

    app = create_app(ServeConfig(model=MODEL), pipe)
    app.add_middleware(_ReplicaHeader, replica="r-7")
    transport = httpx.ASGITransport(app=app)

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                await _wait_ready(client)
                plain = await client.post("/v1/images/generations", json={"prompt": "a 2", "seed": 1})
                ask = {"prompt": "a 2", "seed": 1, "stream": True, "num_inference_steps": 2}
                streamed = await client.post("/v1/images/generations", json=ask)
                missing = await client.get("/nothing-here")
                return plain, streamed, missing

    import asyncio

    plain, streamed, missing = asyncio.run(go())
    for r in (plain, streamed, missing):
        assert r.headers[REPLICA_HEADER] == "r-7"
    assert plain.status_code == 200 and plain.json()["data"][0]["seed"] == 1
    assert streamed.text.rstrip().split("\n\n")[-1].startswith("event: completed")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


async def _wait_ready(client):
    import asyncio

    for _ in range(600):
        if (await client.get("/health")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the app did not become ready in 30 s")


def test_from_args_builds_the_deployment_or_refuses_unknown_fields():
    """`serve run fastflow.serve.ray_app:from_args k=v ...`: strings converted by ServeConfig's field
    types; binding loads nothing (no Ray cluster needed)."""
    pytest.importorskip("ray.serve")
    from fastflow.serve.ray_app import from_args

    app = from_args({"model": MODEL, "replicas": "3", "max_batch": "8", "batch_window_ms": "5", "device": "cpu",
                     "cpus_per_replica": "2"})  # fmt: skip
    deployment = app._bound_deployment
    assert deployment.num_replicas == 3 and deployment.ray_actor_options == {"num_cpus": 2.0}
    assert deployment.max_ongoing_requests == 64 + 8  # the engine's queue and a batch: its 429 answers first
    with pytest.raises(InputError, match="unknown argument 'modle'"):
        from_args({"modle": MODEL, "replicas": "2"})
    with pytest.raises(InputError, match="max_batch"):
        from_args({"model": MODEL, "max_batch": "0"})


def test_cli_replicas_needs_ray(monkeypatch, capsys):
    from fastflow.cli import main

    monkeypatch.setattr("fastflow.serve.run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", MODEL, "--replicas", "2"]) == 2
    assert "add --ray" in capsys.readouterr().err


def test_without_ray_the_error_says_what_to_install(monkeypatch):
    from fastflow.serve import ray_app

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(InputError, match=r"pip install 'fastflow\[ray\]'"):
        ray_app.build(ServeConfig(model=MODEL), 2)
    with pytest.raises(InputError, match=r"pip install 'fastflow\[ray\]'"):
        ray_app.run(ServeConfig(model=MODEL), 2)
