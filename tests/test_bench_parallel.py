"""bench/parallel.py --quick: the communication it counts (fastflow.parallel on the meta device, one
process acting as a rank of a fake world) equals the hand computation from the shapes, the projection
is consistent, and the gloo correctness run's split results equal one process's."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).parent.parent / "bench"
BF16 = 2


def _run(tmp_path):
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location("bench_parallel", BENCH / "parallel.py")
        bench = importlib.util.module_from_spec(spec)
        sys.modules["bench_parallel"] = bench  # its dataclasses look their module up
        spec.loader.exec_module(bench)
        out = tmp_path / "parallel.jsonl"
        assert bench.main(["--quick", "--json", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("bench_parallel", None)
        torch.set_num_threads(threads)
    return bench, [json.loads(line) for line in out.read_text().splitlines()]


def _kinds(row) -> dict:
    return {g["kind"]: (g["count"], g["sent_bytes"], g["received_bytes"]) for g in row["rank0"]["per_collective"]}


def test_quick_run_counts_what_the_shapes_say(tmp_path, capsys):
    bench, rows = _run(tmp_path)
    printed = capsys.readouterr().out
    comm = {(r["workload"], r["scheme"]): r for r in rows if r["part"] == "comm"}
    assert set(comm) == {(w, bench.describe(s)) for w, s in bench.QUICK}
    heads, d, img, txt = 24, 128, 4096, 512  # FLUX.1-dev at 1024^2; 1 double + 1 single block: 2 attentions

    # ulysses=2: rank 0 holds 256 text + 2048 image tokens; q, k, v of 12 of 24 heads go to the other rank
    tokens = txt // 2 + img // 2
    qkv, out = 3 * tokens * heads // 2 * d * BF16, tokens * heads // 2 * d * BF16
    gather = img // 2 * 64 * BF16  # the final layer's 64 channels of its image tokens, to the other rank
    u = comm[("flux-quick", "ulysses=2")]
    assert _kinds(u) == {
        "ulysses_qkv": (2, qkv, qkv),
        "ulysses_out": (2, out, out),
        "gather_tokens": (1, gather, gather),
    }
    assert u["rank0"]["sent_bytes"] == 2 * (qkv + out) + gather == 56_885_248
    assert u["last_rank"]["sent_bytes"] == u["rank0"]["sent_bytes"]  # even shards

    # ring=2: one hop of K and V (all heads) of 2304 tokens per attention
    kv = 2 * tokens * heads * d * BF16
    assert _kinds(comm[("flux-quick", "ring=2")]) == {"ring_kv": (2, kv, kv), "gather_tokens": (1, gather, gather)}

    # ulysses=2 x ring=2: 1152 tokens; the ring passes the ulysses group's 2304 tokens of 12 heads
    quarter = txt // 4 + img // 4
    assert _kinds(comm[("flux-quick", "ulysses=2,ring=2")]) == {
        "ulysses_qkv": (2, 3 * quarter * 12 * d * BF16, 3 * quarter * 12 * d * BF16),
        "ring_kv": (2, 2 * 2 * quarter * 12 * d * BF16, 2 * 2 * quarter * 12 * d * BF16),
        "ulysses_out": (2, quarter * 12 * d * BF16, quarter * 12 * d * BF16),
        "gather_tokens": (1, 3 * img // 4 * 64 * BF16, 3 * img // 4 * 64 * BF16),
    }

    # SD3.5 cfg=2: no token split; the velocity's row [16, 128, 128] goes to the other cfg rank once
    assert _kinds(comm[("sd35-quick", "cfg=2")]) == {"gather_rows": (1, 16 * 128 * 128 * BF16, 16 * 128 * 128 * BF16)}

    for r in comm.values():
        p = r["projection"]
        assert 0 <= p["exposed_comm_ms"] <= p["comm_ms"] and p["step_ms"] <= p["step_ms_no_overlap"]
        assert 1.0 < p["speedup"] <= r["ranks"], r
    assert "PROJECTION" in printed and "CORRECTNESS run, not a speed claim" in printed

    # once per generation, data=2 with 2 images: rank 0's noise [2, 16, 128, 128] fp32 to rank 1; each rank
    # decodes one 1024^2 bf16 image and sends it to the other; a cache decision all-reduces one float64
    generation = {r["rank"]: r["collectives"] for r in rows if r["part"] == "generation"}
    noise, image = 2 * 16 * 128 * 128 * 4, 3 * 1024 * 1024 * BF16

    def sent(rank):
        return [(c["kind"], c["collective"], c["sent_bytes"], c["received_bytes"]) for c in generation[rank]]

    seed = sent(0)[0]
    assert seed[:2] == ("broadcast_seed", "broadcast_object_list") and 8 < seed[2] < 64
    assert sent(0)[1:] == [("broadcast_noise", "broadcast", noise, 0), ("reduce_change", "all_reduce", 8, 8),
                           ("decode_rows", "all_gather_single", image, image)]  # fmt: skip
    assert sent(1) == [("broadcast_noise", "broadcast", 0, noise), ("reduce_change", "all_reduce", 8, 8),
                       ("decode_rows", "all_gather_single", image, image)]  # fmt: skip

    gloo = [r for r in rows if r["part"] == "gloo"]
    assert {(r["what"], r["scheme"]) for r in gloo} == {(w, bench.describe(s)) for w, s, _ in bench_gloo_cases()}
    for r in gloo:
        assert r["rel_err"] <= 1e-5 and r["split_ms"] > 0 and r["one_process_ms"] > 0, r


def bench_gloo_cases():
    sys.path.insert(0, str(BENCH))
    try:
        import parallel_gloo

        return parallel_gloo.scenarios(2, quick=True)
    finally:
        sys.path.remove(str(BENCH))
