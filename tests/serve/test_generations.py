"""POST /v1/images/generations over loopback: images equal the in-process ones for their seeds,
batched or not (PNG pixels, bit for bit), concurrent requests are merged into pipeline calls
(seen in /metrics), streaming answers progress events then the same JSON."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np

from .conftest import httpx, metric, png_pixels, reference, serving


def test_one_request_equals_in_process(pipe):
    with serving(pipe) as (base, _):
        r = httpx.post(base + "/v1/images/generations", json={"prompt": "a 3", "seed": 7, "n": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["seed"] for d in body["data"]] == [7, 8]
    assert body["model"] == "fastflow-tiny-digits" and body["settings"]["num_inference_steps"] == 16
    for d in body["data"]:
        assert np.array_equal(png_pixels(d["b64_json"]), reference(pipe, "a 3", d["seed"]))


def test_concurrent_requests_batched_equal_in_process(pipe):
    """8 clients with different prompts and seeds, max_batch 4, a wide window: the worker merges
    them (fewer pipeline calls than requests, seen in /metrics) and every image is its seed's."""
    asks = [(f"a {i % 10}", 100 + 17 * i) for i in range(8)]
    with serving(pipe, max_batch=4, batch_window_ms=1500) as (base, _):

        def ask(prompt_seed):
            prompt, seed = prompt_seed
            r = httpx.post(base + "/v1/images/generations", json={"prompt": prompt, "seed": seed}, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, asks))
        text = httpx.get(base + "/metrics", timeout=10).text
    calls = metric(text, "fastflow_batch_size_count")
    assert metric(text, "fastflow_batch_size_sum") == 8
    assert calls < 8 and metric(text, 'fastflow_batch_size_bucket{le="1.0"}') < calls, text
    assert metric(text, "fastflow_images_total") == 8
    for (prompt, seed), body in zip(asks, answers, strict=True):
        assert body["data"][0]["seed"] == seed
        assert np.array_equal(png_pixels(body["data"][0]["b64_json"]), reference(pipe, prompt, seed)), (prompt, seed)


def test_stream_progress_then_completed(pipe):
    with serving(pipe) as (base, _):
        ask = {"prompt": "a 5", "seed": 3, "num_inference_steps": 4, "stream": True}
        with httpx.stream("POST", base + "/v1/images/generations", json=ask, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            text = "".join(r.iter_text())
    events = [(e.split("\n")[0].removeprefix("event: "), json.loads(e.split("\n")[1].removeprefix("data: ")))
              for e in text.strip().split("\n\n")]  # fmt: skip
    assert [name for name, _ in events] == ["progress"] * 4 + ["completed"]
    assert [data for _, data in events[:4]] == [{"step": i, "steps": 4} for i in range(1, 5)]
    done = events[-1][1]
    assert done["data"][0]["seed"] == 3
    expected = reference(pipe, "a 5", 3, num_inference_steps=4)
    assert np.array_equal(png_pixels(done["data"][0]["b64_json"]), expected)


def test_health_models_page(pipe):
    with serving(pipe) as (base, _):
        assert httpx.get(base + "/health").json()["status"] == "ok"
        models = httpx.get(base + "/v1/models").json()
        page = httpx.get(base + "/")
    assert models["data"][0]["id"] == "fastflow-tiny-digits" and models["data"][0]["size_multiple"] == 4
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert b"<" in page.content
