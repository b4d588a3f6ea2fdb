"""``fastflow serve``'s arguments -> ServeConfig, its refusals (exit 2), and the loud warning for a
non-loopback address without an API key."""

from __future__ import annotations

import warnings

import pytest

import fastflow.serve
from fastflow.cli import main
from fastflow.serve import ServeConfig, is_loopback

from .conftest import MODEL


def test_arguments_make_the_config(tmp_path, monkeypatch):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    seen = []
    monkeypatch.setattr(fastflow.serve, "run", lambda config, pipe=None: seen.append(config))
    argv = ["serve", MODEL, "--port", "9123", "--max-batch", "2", "--max-queue", "5", "--lora", f"style={lora}",
            "--lora-dir", str(tmp_path), "--cache", "fbcache", "--max-images", "3", "--timeout", "7"]  # fmt: skip
    assert main(argv) == 0
    config = seen[0]
    assert (config.model, config.host, config.port, config.max_batch, config.max_queue) == (
        MODEL,
        "127.0.0.1",
        9123,
        2,
        5,
    )
    assert config.loras == {"style": str(lora)} and config.lora_dir == str(tmp_path) and config.cache == "fbcache"
    assert (config.max_images, config.timeout_s, config.api_key) == (3, 7.0, None)


@pytest.mark.parametrize(
    "extra",
    [["--max-batch", "0"], ["--max-queue", "0"], ["--lora", "nameonly"], ["--lora", "x=/no/such.safetensors"],
     ["--lora-dir", "/no/such/folder"], ["--api-key", "short"], ["--port", "70000"]],
)  # fmt: skip
def test_bad_arguments_exit_2(extra, monkeypatch, capsys):
    monkeypatch.setattr(fastflow.serve, "run", lambda config, pipe=None: pytest.fail("must not start"))
    assert main(["serve", MODEL, *extra]) == 2
    assert "fastflow: error:" in capsys.readouterr().err


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.4")


def test_non_loopback_without_key_warns(monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    with pytest.warns(UserWarning, match="WITHOUT an API key"):
        fastflow.serve.run(ServeConfig(model=MODEL, host="0.0.0.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastflow.serve.run(ServeConfig(model=MODEL, host="0.0.0.0", api_key="a-long-key-123"))
        fastflow.serve.run(ServeConfig(model=MODEL))
