"""Load bench of ``fastflow serve`` over loopback: N clients for T seconds against a one-request-
at-a-time baseline, in the same run, on the same loaded pipeline.

Each run starts a fresh server (uvicorn on a thread of this process, on a port the OS picks, the
pipeline loaded once and shared) and its clients (threads, one keep-alive HTTP connection each)
send ``POST /v1/images/generations`` (n=1, prompts "a 0".."a 9", a new seed each) back to back
until T seconds have passed; requests in flight then finish and are counted. Reported per run:
requests sent / answered / failed / lost (sent - answered - failed: requests with no answer at
all, must be 0), images/s (images answered over the time from the first request to the last
answer), p50 / p99 latency (client-side, per request), and the server's batch-size histogram
(images per pipeline call, from /metrics: its change over the run).

Runs (default): ``serial`` (1 client, --max-batch 1: one request at a time), ``concurrent``
(N clients, max_batch 1: queued, not merged) and ``batched`` (N clients, --max-batch B).
``--url`` benches a server already running: 1 client, then N; behind a Ray Serve deployment
(fastflow/serve/ray_app.py) the histogram sums every replica's /metrics.

    python bench/serve.py [--clients 8] [--seconds 10] [--max-batch 8] [--threads 1] [--out serve.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import threading
import time

MODEL = "fastflow-tiny-digits"
BATCH_METRIC = "fastflow_batch_size_bucket"
REPLICA_HEADER = "x-fastflow-replica"  # fastflow.serve.ray_app's: which Ray Serve replica answered


def quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (p99 of 50 samples is their largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def batch_buckets(metrics_text: str) -> dict[float, float]:
    """``fastflow_batch_size_bucket`` as {upper bound: cumulative count} (+Inf as inf)."""
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith(BATCH_METRIC + "{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram(before: dict[float, float], after: dict[float, float]) -> dict[str, int]:
    """Pipeline calls per batch-size bucket over a run: {"1": calls of 1 image, "2": ..., "5-6": ...}."""
    out, lower, below = {}, 0, 0
    for bound in sorted(after):
        cumulative = int(after[bound] - before.get(bound, 0.0))
        if cumulative > below:
            label = (
                f">{lower}"
                if math.isinf(bound)
                else str(int(bound))
                if int(bound) == lower + 1
                else f"{lower + 1}-{int(bound)}"
            )
            out[label] = cumulative - below
        if not math.isinf(bound):
            lower = int(bound)
        below = cumulative
    return out


def parse_metrics(text: str) -> dict:
    """{"buckets": batch buckets, "batch_sum": images over all pipeline calls, "images": images served}."""
    values = {}
    for line in text.splitlines():
        for name in ("fastflow_batch_size_sum", "fastflow_images_total"):
            if line.startswith(name + " "):
                values[name] = float(line.rsplit(" ", 1)[1])
    return {"buckets": batch_buckets(text), "batch_sum": values.get("fastflow_batch_size_sum", 0.0),
            "images": values.get("fastflow_images_total", 0.0)}  # fmt: skip


def metrics_snapshot(client, base: str, settle: int = 16, limit: int = 200) -> dict[str, dict]:
    """/metrics of every replica behind ``base``: {replica: parse_metrics(...)}. A Ray Serve
    deployment answers each GET from one replica (the x-fastflow-replica header says which): GETs
    until ``settle`` in a row found no new replica. A plain server has one ("-")."""
    seen, quiet = {}, 0
    for _ in range(limit):
        r = client.get(base + "/metrics", timeout=30)
        r.raise_for_status()
        replica = r.headers.get(REPLICA_HEADER, "-")
        quiet = quiet + 1 if replica in seen else 0
        seen[replica] = parse_metrics(r.text)
        if replica == "-" or quiet >= settle:
            break
    return seen


def metrics_delta(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """A run's batch histogram, batch-size sum and images served, summed over the replicas."""
    buckets, batch_sum, images = {}, 0.0, 0.0
    for replica, now in after.items():
        then = before.get(replica, {"buckets": {}, "batch_sum": 0.0, "images": 0.0})
        for bound, count in now["buckets"].items():
            buckets[bound] = buckets.get(bound, 0.0) + count - then["buckets"].get(bound, 0.0)
        batch_sum += now["batch_sum"] - then["batch_sum"]
        images += now["images"] - then["images"]
    return {"hist": histogram({}, buckets), "batch_sum": batch_sum, "images": images,
            "replicas": len(after), "partial": set(after) != set(before)}  # fmt: skip


def load(base: str, clients: int, seconds: float, steps: int | None, seed0: int, api_key: str | None = None) -> dict:
    """``clients`` threads posting back to back for ``seconds``; the counts, latencies and batch sizes."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    lock = threading.Lock()
    stats = {"sent": 0, "answered": 0, "failed": 0, "images": 0, "errors": {}}
    latencies: list[float] = []
    next_seed = [seed0]
    with httpx.Client(headers=headers) as probe:
        before = metrics_snapshot(probe, base)
    start = time.perf_counter()
    stop_at = start + seconds
    last_answer = [start]

    def client_loop():
        with httpx.Client(headers=headers, timeout=httpx.Timeout(600.0, connect=30.0)) as http:
            while time.perf_counter() < stop_at:
                with lock:
                    seed = next_seed[0]
                    next_seed[0] += 1
                    stats["sent"] += 1
                ask = {"prompt": f"a {seed % 10}", "seed": seed, "n": 1}
                if steps is not None:
                    ask["num_inference_steps"] = steps
                t = time.perf_counter()
                try:
                    r = http.post(base + "/v1/images/generations", json=ask)
                except httpx.HTTPError as e:  # no answer: counted as lost
                    with lock:
                        stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1
                    continue
                done = time.perf_counter()
                with lock:
                    last_answer[0] = max(last_answer[0], done)
                    if r.status_code == 200:
                        stats["answered"] += 1
                        stats["images"] += len(r.json()["data"])
                        latencies.append(done - t)
                    else:
                        stats["failed"] += 1
                        key = str(r.status_code)
                        stats["errors"][key] = stats["errors"].get(key, 0) + 1

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(seconds + 900)
    elapsed = last_answer[0] - start
    with httpx.Client(headers=headers) as probe:
        delta = metrics_delta(before, metrics_snapshot(probe, base))
    hist = delta["hist"]
    calls = sum(hist.values())
    return {
        "clients": clients,
        "seconds": seconds,
        "sent": stats["sent"],
        "answered": stats["answered"],
        "failed": stats["failed"],
        "lost": stats["sent"] - stats["answered"] - stats["failed"],
        "errors": stats["errors"],
        "images": stats["images"],
        "images_served_metric": int(delta["images"]),
        "replicas": delta["replicas"],
        "metrics_partial": delta["partial"],
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(stats["images"] / elapsed, 3) if elapsed > 0 else 0.0,
        "p50_ms": None if not latencies else round(1000 * quantile(latencies, 0.50), 1),
        "p99_ms": None if not latencies else round(1000 * quantile(latencies, 0.99), 1),
        "pipeline_calls": calls,
        "mean_batch": round(delta["batch_sum"] / calls, 2) if calls else None,
        "batch_hist": hist,
    }


@contextlib.contextmanager
def serving(pipe, **settings):
    """An in-process server of ``pipe`` (uvicorn on a thread, loopback, a port the OS picks): its base URL."""
    import httpx
    import uvicorn

    from fastflow.serve import ServeConfig, create_app

    app = create_app(ServeConfig(model=MODEL, log_level="warning", **settings), pipe)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=60))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the bench server did not come up in 120 s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(120)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("the bench server did not stop in 120 s")


def plan(args) -> list[tuple[str, int, int | None]]:
    """(name, clients, max_batch) per run; max_batch None: the server at --url as it is."""
    if args.url:
        return [("serial", 1, None), ("concurrent", args.clients, None)]
    return [("serial", 1, 1), ("concurrent", args.clients, 1), ("batched", args.clients, args.max_batch)]


def bench(args) -> dict:
    runs = []
    seed0 = 0
    if args.url:
        for name, clients, _ in plan(args):
            run = load(args.url.rstrip("/"), clients, args.seconds, args.steps, seed0, args.api_key)
            runs.append({"name": name, "max_batch": None, **run})
            seed0 += run["sent"]
    else:
        import torch

        import fastflow

        if args.threads:
            torch.set_num_threads(args.threads)
        pipe = fastflow.load(args.model)
        pipe("a 0", seed=0, progress=False)  # warm: first-call costs out of the runs
        for name, clients, max_batch in plan(args):
            with serving(pipe, max_batch=max_batch, max_queue=max(64, 2 * clients),
                         batch_window_ms=args.batch_window_ms) as base:  # fmt: skip
                run = load(base, clients, args.seconds, args.steps, seed0)
            runs.append({"name": name, "max_batch": max_batch, **run})
            seed0 += run["sent"]
    serial = runs[0]["images_per_s"]
    for run in runs:
        run["speedup"] = round(run["images_per_s"] / serial, 2) if serial else None
    import torch

    return {
        "bench": "serve",
        "model": args.model if not args.url else args.url,
        "clients": args.clients,
        "seconds": args.seconds,
        "max_batch": args.max_batch,
        "batch_window_ms": args.batch_window_ms,
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "lost": sum(run["lost"] for run in runs),
    }


COLUMNS = [("run", "name"), ("clients", "clients"), ("replicas", "replicas"), ("max batch", "max_batch"),
           ("sent", "sent"), ("answered", "answered"), ("failed", "failed"), ("lost", "lost"),
           ("images/s", "images_per_s"), ("speedup", "speedup"), ("p50 ms", "p50_ms"), ("p99 ms", "p99_ms"),
           ("mean batch", "mean_batch"), ("batch sizes (calls)", "batch_hist")]  # fmt: skip


def table(report: dict) -> str:
    def cell(run, key):
        value = run[key]
        if key == "batch_hist":
            return ", ".join(f"{size}: {calls}" for size, calls in value.items()) or "-"
        if key == "max_batch" and value is None:
            return "server's"
        return f"{value:.2f}" if key == "images_per_s" else str(value)

    lines = ["| " + " | ".join(title for title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(run, key) for _, key in COLUMNS) + " |" for run in report["runs"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL, help="what fastflow.load takes (default: the embedded model)")
    p.add_argument("--url", default=None, help="bench a running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="with --url: the server's bearer key")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the concurrent / batched runs")
    p.add_argument("--seconds", type=float, default=8.0, help="how long each run sends requests")
    p.add_argument("--max-batch", type=int, default=8, help="the batched run's max_batch")
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_batch < 1:
        p.error("--clients and --max-batch must be >= 1, --seconds > 0")
    report = bench(args)
    print(table(report))
    if report["lost"]:
        print(f"LOST REQUESTS: {report['lost']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
