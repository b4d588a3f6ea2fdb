"""Back-pressure and failure isolation: a full queue answers 429 with Retry-After, a client that
disconnects before its work starts has it cancelled, a request past its timeout gets 504, a
request the model refuses fails alone (its batch-mates get their images), /health says loading
(503) until the model is ready and --compile has warmed it."""

from __future__ import annotations

import concurrent.futures
import socket

import numpy as np

from .conftest import gated, httpx, metric, png_pixels, reference, serving, wait_for

GEN = "/v1/images/generations"


def _post(base, body, timeout=120):
    return httpx.post(base + GEN, json=body, timeout=timeout)


def test_queue_full_429_then_all_served(pipe):
    with serving(pipe, max_queue=2, max_batch=1) as (base, app), concurrent.futures.ThreadPoolExecutor(4) as pool:
        engine = app.state.server.engine
        with gated(app) as (gate, entered):
            running = pool.submit(_post, base, {"prompt": "a 1", "seed": 1})
            assert entered.wait(30)
            queued = [pool.submit(_post, base, {"prompt": "a 2", "seed": s}) for s in (2, 3)]
            wait_for(lambda: engine.queued() == 2, "two queued requests")
            r = _post(base, {"prompt": "a 3", "seed": 4})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
            gate.set()
        answers = [f.result(60) for f in (running, *queued)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert 'fastflow_errors_total{code="429"} 1.0' in httpx.get(base + "/metrics").text


def test_disconnect_cancels_queued_work(pipe):
    with serving(pipe, max_batch=1) as (base, app), concurrent.futures.ThreadPoolExecutor(2) as pool:
        engine = app.state.server.engine
        with gated(app) as (gate, entered):
            running = pool.submit(_post, base, {"prompt": "a 1", "seed": 1})
            assert entered.wait(30)
            port = int(base.rsplit(":", 1)[1])
            body = b'{"prompt": "a 9", "seed": 99, "n": 3}'
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                wait_for(lambda: engine.queued() == 1, "the request in the queue")
                job = engine._queue[0]
            wait_for(lambda: job.cancelled, "the disconnect to cancel the queued job")
            gate.set()
        assert running.result(60).status_code == 200
        wait_for(lambda: engine.queued() == 0, "the queue to empty")
        text = httpx.get(base + "/metrics").text
        assert metric(text, "fastflow_images_total") == 1  # the 3 images of the cancelled request never ran
        assert metric(text, "fastflow_batch_size_count") == 1
        assert not job.started


def test_timeout_504_and_worker_goes_on(pipe):
    with serving(pipe, timeout_s=1.0, max_batch=1) as (base, app), concurrent.futures.ThreadPoolExecutor(2) as pool:
        with gated(app) as (gate, entered):
            first = pool.submit(_post, base, {"prompt": "a 1", "seed": 1})
            assert entered.wait(30)
            second = _post(base, {"prompt": "a 2", "seed": 2})
            assert second.status_code == 504 and second.json()["error"]["code"] == "timeout"
            gate.set()
        assert first.result(60).status_code == 504  # it ran past its deadline too
        engine = app.state.server.engine
        wait_for(lambda: engine.queued() == 0 and not engine._running_jobs, "the worker to finish")
        assert engine._thread.is_alive()


def test_refused_request_fails_alone_in_its_batch(pipe):
    """The model refuses one request of a batch (here: the LoRA scales of the call fail for it):
    the batch is retried request by request, the others get their own images, the worker lives."""
    with (
        serving(pipe, max_batch=4, batch_window_ms=1000) as (base, app),
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        engine = app.state.server.engine

        def failing_generate(batch, real=engine._generate):
            if any(job.work.prompt == "poison" for job in batch):
                from fastflow.errors import InputError

                raise InputError("this request cannot run")
            return real(batch)

        engine._generate = failing_generate
        asks = [("a 1", 5), ("poison", 6), ("a 3", 7)]
        futures = [pool.submit(_post, base, {"prompt": p, "seed": s}) for p, s in asks]
        answers = [f.result(60) for f in futures]
        assert [a.status_code for a in answers] == [200, 422, 200], [a.text for a in answers]
        assert answers[1].json()["error"]["code"] == "unprocessable"
        for (prompt, seed), a in zip(asks, answers, strict=True):
            if a.status_code == 200:
                assert np.array_equal(png_pixels(a.json()["data"][0]["b64_json"]), reference(pipe, prompt, seed))
        assert _post(base, {"prompt": "a 4", "seed": 8}).status_code == 200


def test_stream_disconnect_cancels_queued_work(pipe):
    with serving(pipe, max_batch=1) as (base, app), concurrent.futures.ThreadPoolExecutor(2) as pool:
        engine = app.state.server.engine
        with gated(app) as (gate, entered):
            running = pool.submit(_post, base, {"prompt": "a 1", "seed": 1})
            assert entered.wait(30)
            ask = {"prompt": "a 9", "seed": 99, "stream": True}
            with httpx.stream("POST", base + GEN, json=ask, timeout=30) as r:
                assert r.status_code == 200
                wait_for(lambda: engine.queued() == 1, "the request in the queue")
                job = engine._queue[0]
            wait_for(lambda: job.cancelled, "the disconnect to cancel the streamed job")
            gate.set()
        assert running.result(60).status_code == 200
        wait_for(lambda: engine.queued() == 0, "the queue to empty")
        assert metric(httpx.get(base + "/metrics").text, "fastflow_images_total") == 1 and not job.started


def test_disconnect_interrupts_running_work_nobody_waits_for(pipe):
    """Every client of a running call gone: the call stops after its current step (pipe.interrupt)."""
    with serving(pipe, max_batch=1) as (base, app):
        engine = app.state.server.engine
        steps = []
        with gated(app) as (gate, entered):
            ask = {"prompt": "a 9", "seed": 99, "num_inference_steps": 50, "stream": True}
            with httpx.stream("POST", base + GEN, json=ask, timeout=30) as r:
                assert r.status_code == 200
                assert entered.wait(30)
                job = engine._running_jobs[0]
            wait_for(lambda: job.cancelled, "the disconnect")
            original = job.progress
            job.progress = lambda step, total: (steps.append(step), original(step, total))
            gate.set()
            wait_for(lambda: not engine._running_jobs, "the call to end")
        assert steps and max(steps) < 50, steps
        text = httpx.get(base + "/metrics").text
        assert metric(text, "fastflow_images_total") == 0
        assert _post(base, {"prompt": "a 1", "seed": 1}).status_code == 200


def test_shutting_down_answers_503(pipe):
    with serving(pipe) as (base, app):
        app.state.server.engine.stop_accepting()
        r = _post(base, {"prompt": "a 1"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        h = httpx.get(base + "/health", timeout=10)
        assert h.status_code == 503 and h.json() == {"status": "shutting_down"}
