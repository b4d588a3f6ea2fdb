"""bench/cpu.py --quick: the CPU comparison runs end to end at tiny sizes and reports every variant
of every workload (a row with times, or a row saying why it was skipped)."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).parent.parent / "bench"


def test_quick_run_reports_every_variant(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    threads, casts = torch.get_num_threads(), torch._inductor.config.emulate_precision_casts
    try:
        spec = importlib.util.spec_from_file_location("bench_cpu", BENCH / "cpu.py")
        cpu = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cpu)
        out = tmp_path / "cpu.jsonl"
        assert cpu.main(["--quick", "--json", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCH))
        torch.set_num_threads(threads)
        torch._inductor.config.emulate_precision_casts = casts
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["workload"], r["variant"]) for r in rows} == {(w, v) for w in cpu.WORKLOADS for v in cpu.VARIANTS}
    for section in printed.split("### ")[1:]:
        table_rows = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
        assert table_rows[1:] == cpu.VARIANTS, section  # after the header row, every variant in order
    timed = {(r["workload"], r["variant"]): r for r in rows if "ms" in r}
    for workload in cpu.WORKLOADS:  # the eager variants always run, and agree with diffusers fp32
        for variant in ("diffusers fp32", "diffusers bf16", "fastflow bf16"):
            r = timed[(workload, variant)]
            assert r["ms"] > 0 and r["cpu_s"] > 0 and r["rel_err"] < 0.05, r
    assert ("flux", "fastflow bf16 + compile") in timed  # compiled (dynamo's eager backend) in --quick
