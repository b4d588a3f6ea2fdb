"""Every bad request is answered 4xx with the contract's JSON error, before any work, and the
server keeps serving: malformed JSON, missing / empty prompt, n, size, steps, unknown fields,
bad sampler / cache names, limits (413), the API key (401), unknown routes and methods."""

from __future__ import annotations

import pytest

from .conftest import httpx, serving

GEN = "/v1/images/generations"
BAD = [  # (body: dict or raw bytes, status, code)
    (b"{", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'"a prompt"', 400, "invalid_json"),
    ({}, 400, "missing_field"),
    ({"prompt": "   "}, 400, "missing_field"),
    ({"prompt": None}, 400, "missing_field"),
    ({"prompt": 3}, 400, "invalid_value"),
    ({"prompt": "a\x00b"}, 400, "invalid_value"),
    ({"prompt": "a" * 4001}, 413, "prompt_too_long"),
    ({"prompt": "a 1", "n": 0}, 400, "invalid_value"),
    ({"prompt": "a 1", "n": "2"}, 400, "invalid_value"),
    ({"prompt": "a 1", "n": True}, 400, "invalid_value"),
    ({"prompt": "a 1", "n": 1.0}, 400, "invalid_value"),
    ({"prompt": "a 1", "n": 9}, 413, "too_many_images"),
    ({"prompt": "a 1", "size": "16"}, 400, "invalid_value"),
    ({"prompt": "a 1", "size": 16}, 400, "invalid_value"),
    ({"prompt": "a 1", "size": "15x16"}, 400, "invalid_value"),
    ({"prompt": "a 1", "size": "0x16"}, 400, "invalid_value"),
    ({"prompt": "a 1", "size": "-16x16"}, 400, "invalid_value"),
    ({"prompt": "a 1", "size": "128x16"}, 400, "invalid_value"),  # over the model's 64 px per side
    ({"prompt": "a 1", "size": "32x32"}, 413, "too_large"),  # over this server's max_pixels
    ({"prompt": "a 1", "num_inference_steps": 0}, 400, "invalid_value"),
    ({"prompt": "a 1", "num_inference_steps": 51}, 400, "invalid_value"),
    ({"prompt": "a 1", "num_inference_steps": 2.5}, 400, "invalid_value"),
    ({"prompt": "a 1", "num_inference_steps": "4"}, 400, "invalid_value"),
    ({"prompt": "a 1", "prompt_embeds": [1]}, 400, "unknown_field"),
    ({"prompt": "a 1", "quality": "hd"}, 400, "unknown_field"),
    ({"prompt": "a 1", "sampler": "nope"}, 400, "invalid_value"),
    ({"prompt": "a 1", "sampler": 1}, 400, "invalid_value"),
    ({"prompt": "a 1", "cache": "nope"}, 400, "invalid_value"),
    ({"prompt": "a 1", "cache": "/etc/passwd.json"}, 400, "invalid_value"),
    ({"prompt": "a 1", "guidance_scale": 3.5}, 400, "invalid_value"),  # the tiny model has no guidance input
    ({"prompt": "a 1", "seed": -2}, 400, "invalid_value"),
    ({"prompt": "a 1", "seed": "1"}, 400, "invalid_value"),
    ({"prompt": "a 1", "seed": 2**63}, 400, "invalid_value"),
    ({"prompt": "a 1", "seed": 1.5}, 400, "invalid_value"),
    ({"prompt": "a 1", "response_format": "url"}, 400, "invalid_value"),
    ({"prompt": "a 1", "stream": "yes"}, 400, "invalid_value"),
    ({"prompt": "a 1", "negative_prompt": 5}, 400, "invalid_value"),
    ({"prompt": "a 1", "model": "dall-e-3"}, 404, "model_not_found"),
    ({"prompt": "a 1", "loras": {"name": "x"}}, 400, "invalid_value"),
    ({"prompt": "a 1", "loras": [{"name": "x"}]}, 404, "lora_not_found"),
    ({"prompt": "a 1", "loras": [{"path": "x.safetensors"}]}, 400, "lora_path_refused"),  # no --lora-dir
    ({"prompt": "a 1", "loras": [{"name": "x", "path": "y"}]}, 400, "invalid_value"),
    ({"prompt": "a 1", "loras": [{"name": "x", "weight": 1}]}, 400, "unknown_field"),
    ({"prompt": "a 1", "loras": [{"name": "x", "scale": "1"}]}, 400, "invalid_value"),
    ({"prompt": "a 1", "loras": [{"name": "x", "scale": 1e9}]}, 400, "invalid_value"),
]


def check_error(r, status: int, code: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, max_pixels=16 * 16, max_images=8, max_steps=50, max_body_bytes=8192) as (base, app):
        yield base, app


@pytest.mark.parametrize("body,status,code", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_generation_request(server, body, status, code):
    base, app = server
    if isinstance(body, bytes):
        r = httpx.post(base + GEN, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(base + GEN, json=body, timeout=30)
    check_error(r, status, code)
    assert app.state.server.engine.queued() == 0


def test_body_limits_and_routes(server):
    base, app = server
    big = b'{"prompt": "' + b"a" * 9000 + b'"}'
    check_error(httpx.post(base + GEN, content=big, timeout=30), 413, "body_too_large")

    def chunks():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 1000

    check_error(httpx.post(base + GEN, content=chunks(), timeout=30), 413, "body_too_large")
    check_error(httpx.get(base + GEN, timeout=30), 405, None)
    check_error(httpx.get(base + "/v1/nothing", timeout=30), 404, "not_found")
    check_error(httpx.post(base + "/v1/images/edits", json={"prompt": "a 1"}, timeout=30), 400, "invalid_form")
    # after all of that the worker still serves, and the errors were counted by status
    ok = httpx.post(base + GEN, json={"prompt": "a 1", "seed": 1}, timeout=60)
    assert ok.status_code == 200, ok.text
    metrics = httpx.get(base + "/metrics", timeout=30).text
    assert 'fastflow_errors_total{code="413"}' in metrics and 'fastflow_errors_total{code="404"}' in metrics


def test_api_key(pipe):
    key = "s3cret-key-0123"
    with serving(pipe, api_key=key) as (base, _):
        ask = {"prompt": "a 2", "seed": 4}
        check_error(httpx.post(base + GEN, json=ask, timeout=30), 401, "invalid_api_key")
        wrong = {"Authorization": "Bearer s3cret-key-0124"}
        check_error(httpx.post(base + GEN, json=ask, headers=wrong, timeout=30), 401, "invalid_api_key")
        check_error(httpx.post(base + GEN, json=ask, headers={"Authorization": key}, timeout=30), 401, None)
        check_error(httpx.get(base + "/v1/models", timeout=30), 401, None)
        check_error(httpx.get(base + "/metrics", timeout=30), 401, None)
        assert httpx.get(base + "/health", timeout=30).status_code == 200  # probes need no key
        r = httpx.post(base + GEN, json=ask, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200, r.text
