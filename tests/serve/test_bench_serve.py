"""bench/serve.py at tiny N and T: the three runs (serial, concurrent, batched) are reported with
every field, nothing is lost, the answered images match the server's own count, and the batch-size
histogram (from /metrics) accounts for every image; the histogram parsing on its own."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from .conftest import serving

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_histogram_and_quantile(bench):
    inf = math.inf
    before = {1.0: 2, 2.0: 3, 3.0: 3, 4.0: 5, 6.0: 5, inf: 6}
    after = {1.0: 5, 2.0: 7, 3.0: 7, 4.0: 9, 6.0: 12, inf: 14}
    assert bench.histogram(before, after) == {"1": 3, "2": 1, "5-6": 3, ">6": 1}
    text = 'fastflow_batch_size_bucket{le="1.0"} 4.0\nfastflow_batch_size_bucket{le="+Inf"} 9.0\nother 1\n'
    assert bench.batch_buckets(text) == {1.0: 4.0, inf: 9.0}
    assert bench.quantile([0.3, 0.1, 0.2], 0.5) == 0.2 and bench.quantile(list(range(1, 101)), 0.99) == 99
    assert bench.quantile([], 0.5) is None


def test_tiny_run_reports_every_field_and_loses_nothing(bench, tmp_path, capsys):
    out = tmp_path / "serve.json"
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--clients", "3", "--seconds", "1.5", "--max-batch", "4", "--steps", "4",
                             "--threads", "1", "--out", str(out)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == report
    printed = capsys.readouterr().out
    assert [r["name"] for r in report["runs"]] == ["serial", "concurrent", "batched"]
    assert [(r["clients"], r["max_batch"]) for r in report["runs"]] == [(1, 1), (3, 1), (3, 4)]
    assert report["lost"] == 0
    for run in report["runs"]:
        assert run["sent"] >= run["clients"] and run["lost"] == 0 and run["failed"] == 0, run
        assert run["answered"] == run["sent"] == run["images"] == run["images_served_metric"], run
        assert run["images_per_s"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"], run
        assert sum(run["batch_hist"].values()) == run["pipeline_calls"] > 0, run
        assert run["mean_batch"] == pytest.approx(run["images"] / run["pipeline_calls"], abs=0.006), run
        assert f"| {run['name']} | {run['clients']} | 1 | {run['max_batch']} | {run['sent']} |" in printed
        assert run["replicas"] == 1 and run["metrics_partial"] is False, run
    for run in report["runs"][:2]:  # max_batch 1: one image per call
        assert run["batch_hist"] == {"1": run["images"]}, run
    assert report["runs"][0]["speedup"] == 1.0


def test_url_mode_benches_a_running_server(bench, pipe):
    """--url: 1 client then N against a server already running (its own max_batch); counts match its /metrics."""
    with serving(pipe, max_batch=4) as (base, _):
        report = bench.main(["--url", base, "--clients", "2", "--seconds", "1", "--steps", "2"])
    assert [(r["name"], r["clients"], r["max_batch"]) for r in report["runs"]] == [
        ("serial", 1, None),
        ("concurrent", 2, None),
    ]
    assert report["model"] == base and report["lost"] == 0
    for run in report["runs"]:
        assert run["answered"] == run["sent"] == run["images_served_metric"] > 0, run
        assert sum(run["batch_hist"].values()) == run["pipeline_calls"] > 0 and run["replicas"] == 1, run
