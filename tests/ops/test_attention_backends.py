"""Choosing the attention implementation: `fastflow tune`'s measurement and table, and the runtime
choice from it (CPU tensors, fake candidates and a fake timer: the logic, not GPU speed)."""

import json

import pytest
import torch

from fastflow.cli import main
from fastflow.ops import attention_backends as ab
from fastflow.ops import reference as ref

SHAPES = {"a": (2, 64, 40), "b": (2, 64, 24), "c": (1, 32, 16)}


def _backend(name, fn, available=lambda q, k, v: True):
    return ab.Backend(name, available, fn)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(tmp_path))
    ab.forget()
    yield tmp_path
    ab.forget()


def _ref(q, k, v, scale):
    return ref.attention_ref(q, k, v, scale)


def _slow(q, k, v, scale):
    return ref.attention_ref(q, k, v, scale)


def _wrong(q, k, v, scale):
    return ref.attention_ref(q, k, v, scale) * 1.25


def _broken(q, k, v, scale):
    raise RuntimeError("no kernel image for this GPU")


MS = {_ref: 1.0, _slow: 3.0, _wrong: 0.1, _broken: 0.1, ref.attention_ref: 2.0}


@pytest.fixture
def fakes(monkeypatch):
    backends = {
        "slow": _backend("slow", _slow),
        "fast": _backend("fast", _ref),
        "wrong-but-fastest": _backend("wrong-but-fastest", _wrong),
        "broken": _backend("broken", _broken),
        "absent": _backend("absent", _ref, available=lambda q, k, v: False),
        "sdpa": ab.BACKENDS["sdpa"],  # ref.attention_ref: 2 ms
    }
    monkeypatch.setattr(ab, "BACKENDS", backends)
    return lambda fn: MS[fn.func]  # fn = partial(backend.run, q, k, v, None)


def test_tune_keeps_the_fastest_correct_backend_per_head_dim(table_dir, fakes):
    rows = ab.tune("cpu", SHAPES, dtypes=(torch.bfloat16,), timer=fakes)
    by = {(r["shape"], r["backend"]): r for r in rows}
    assert "wrong result" in by[("a", "wrong-but-fastest")]["error"]
    assert "no kernel image" in by[("a", "broken")]["error"]
    assert by[("a", "absent")]["error"] == "not available"
    assert by[("b", "broken")]["error"] == "failed at an earlier shape"
    assert by[("a", "slow")]["ms"] == 3.0 and by[("a", "slow")]["tflops"] > 0
    table = json.loads((table_dir / "attention.json").read_text())
    entry = table[ab.machine_key(torch.device("cpu"))]
    # head dim 64: shapes a and b summed (fast 2 ms against sdpa 4 and slow 6); head dim 32: c alone
    # and by how much the winner beats plain SDPA (2 ms a shape)
    assert entry == {
        "64/bfloat16": {"backend": "fast", "ms": 2.0, "speedup": 2.0},
        "32/bfloat16": {"backend": "fast", "ms": 1.0, "speedup": 2.0},
    }
    assert {r["backend"] for r in rows if r["chosen"]} == {"fast"}
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    assert ab.choose(q, q, q).name == "fast"
    q = torch.randn(1, 2, 8, 48, dtype=torch.bfloat16)  # not tuned: the default order
    assert ab.choose(q, q, q).name == "sdpa"


def test_choice_without_table_follows_the_default_order(table_dir):
    q = torch.randn(1, 2, 8, 80, dtype=torch.bfloat16)  # no Triton tile for head dim 80, no FA3 on CPU
    assert ab.choose(q, q, q).name == "sdpa"
    assert ab.DEFAULT_ORDER[-1] == "sdpa"  # the last resort runs anything


@pytest.fixture
def gpu(monkeypatch):
    """Every candidate can run the call (a fake CUDA GPU), FA3 only on a fake sm_90 with it installed."""
    capability = {"now": (9, 0)}

    def runs(name):
        if name == "fa3":
            return lambda q, k, v: capability["now"] == (9, 0)
        return lambda q, k, v: True

    monkeypatch.setattr(ab, "BACKENDS", {n: ab.Backend(n, runs(n), b.run) for n, b in ab.BACKENDS.items()})
    return capability


def test_without_a_table_attention_takes_the_safe_default_order(table_dir, gpu):
    """FA3 (sm_90) > cuDNN > flash > SDPA; the Triton kernel, never run on silicon, is not a default."""
    q = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    assert ab.choose(q, q, q).name == "fa3"
    gpu["now"] = (8, 9)  # no FA3 off Hopper
    assert ab.choose(q, q, q).name == "cudnn"
    for gone, then in (("cudnn", "flash"), ("flash", "sdpa")):
        ab.BACKENDS[gone] = ab.Backend(gone, lambda q, k, v: False, ab.BACKENDS[gone].run)
        assert ab.choose(q, q, q).name == then  # not triton
    assert not any(n.startswith("triton") for n in ab.DEFAULT_ORDER)


def test_triton_runs_only_where_tune_timed_it_and_it_won(table_dir, gpu):
    gpu["now"] = (8, 9)
    key = ab.machine_key(torch.device("cpu"))
    entry = {"backend": "triton-persistent", "ms": 1.0, "speedup": 1.3}
    (table_dir / "attention.json").write_text(json.dumps({key: {"128/bfloat16": entry}}))
    q = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    assert ab.choose(q, q, q).name == "triton-persistent"
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)  # not tuned at this head dim
    assert ab.choose(q, q, q).name == "cudnn"


def test_a_table_of_another_fastflow_version_is_not_used(table_dir, gpu, monkeypatch):
    from fastflow.ops import tune_table

    gpu["now"] = (8, 9)
    key = ab.machine_key(torch.device("cpu"))
    assert "| fastflow " in key
    entry = {"backend": "triton", "ms": 1.0}
    (table_dir / "attention.json").write_text(json.dumps({key: {"128/bfloat16": entry}}))
    q = torch.randn(1, 2, 8, 128, dtype=torch.bfloat16)
    assert ab.choose(q, q, q).name == "triton"
    ab.machine_key.cache_clear()
    monkeypatch.setattr(tune_table, "fastflow_version", lambda: "99.0")
    try:
        assert ab.choose(q, q, q).name == "cudnn"
    finally:
        ab.machine_key.cache_clear()


def test_tuned_backend_that_cannot_run_the_call_falls_back(table_dir, monkeypatch):
    key = ab.machine_key(torch.device("cpu"))
    (table_dir / "attention.json").write_text(json.dumps({key: {"80/bfloat16": {"backend": "fa3", "ms": 1.0}}}))
    q = torch.randn(1, 2, 8, 80, dtype=torch.bfloat16)
    assert ab.choose(q, q, q).name == "sdpa"
    (table_dir / "attention.json").write_text(json.dumps({key: {"80/bfloat16": {"backend": "gone", "ms": 1.0}}}))
    ab.forget()
    assert ab.choose(q, q, q).name == "sdpa"


def test_a_corrupt_table_is_ignored_with_a_warning(table_dir, caplog):
    (table_dir / "attention.json").write_text("{not json")
    q = torch.randn(1, 2, 8, 80, dtype=torch.bfloat16)
    with caplog.at_level("WARNING"):
        assert ab.choose(q, q, q).name == "sdpa"
    assert "fastflow tune" in caplog.text


def test_every_backend_returns_the_op_layout():
    """FA3's [B, L, H, D] output and SDPA's [B, H, L, D] both come back as the op's layout."""
    q = torch.randn(1, 3, 10, 16)
    out = ab.BACKENDS["sdpa"].run(q, q, q, None)
    assert out.transpose(1, 2).is_contiguous()


def test_cli_tune_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["tune"]) == 2
    assert "CUDA GPU" in capsys.readouterr().err
    assert main(["tune", "--shapes", "nope"]) == 2
    assert "unknown attention shapes" in capsys.readouterr().err
    assert main(["tune", "--ops", "attention"]) == 2  # attention alone still needs the GPU
