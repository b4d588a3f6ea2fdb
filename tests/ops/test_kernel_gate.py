"""`fastflow tune` gates every kernel: checked against the op's reference and timed against the
reference under torch.compile (a fake timer here, no GPU); a kernel that loses or errs is not
dispatched on that GPU, and the table is read like a stranger's file."""

import json
import warnings

import pytest
import torch

import fastflow.ops as ops
from fastflow.errors import UnsafeCacheError
from fastflow.ops import _registry, kernel_gate, tune_ops, tune_table
from fastflow.ops.tune_inputs import Case, cases

GPU = torch.device("cuda", 0)  # never touched: the machine key is faked


def _ref(x: torch.Tensor) -> torch.Tensor:
    return x * 3.0


def _right(x):
    return x * 3.0


def _right_too(x):
    return x * 3.0


_registry.defop("_test_gate", _ref, lambda x: torch.empty_like(x), impls={"triton": _right, "cuda_cpp": _right_too})
CASES = {"_test_gate": [Case("a", lambda dev: (torch.randn(4, 8),)), Case("b", lambda dev: (torch.randn(2, 8),))]}


@pytest.fixture
def gpu(tmp_path, monkeypatch):
    """A cache folder of our own, both kernel backends installed, and a fake GPU's machine key."""
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_registry, "_available", lambda backend: True)
    monkeypatch.setattr(tune_table, "machine_key", lambda device: "FAKE GPU | fastflow test")
    kernel_gate.forget()
    yield tmp_path
    kernel_gate.forget()


def _timer(ms: dict):
    return lambda fn, label: ms[label.split("/")[1]]


def _tune(ms, **kwargs):
    return tune_ops.tune("cpu", ["_test_gate"], CASES, timer=_timer(ms), compile=lambda f: f, **kwargs)


def test_a_kernel_that_loses_to_the_compiled_reference_is_not_dispatched(gpu):
    opdef = ops.OPS["_test_gate"]
    assert opdef.device_backend("cuda", GPU) == "triton"  # never tuned here: today's order
    _tune({"compiled-reference": 1.0, "triton": 2.0, "cuda_cpp": 0.5})
    assert opdef.device_backend("cuda", GPU) == "cuda_cpp"  # triton lost; the next kernel won
    entry = json.loads((gpu / "kernels.json").read_text())["FAKE GPU | fastflow test"]["_test_gate"]
    assert entry["backend"] == "cuda_cpp" and entry["speedup"] == 2.0 and entry["reference_ms"] == 2.0
    assert entry["candidates"]["triton"].startswith("loses to the compiled reference: 0.5x")
    _tune({"compiled-reference": 1.0, "triton": 1.5, "cuda_cpp": 1.0})  # a tie is no win
    assert opdef.device_backend("cuda", GPU) is None  # the reference runs


def test_a_wrong_or_failing_kernel_never_wins_however_fast(gpu, monkeypatch):
    def wrong(x):
        return x * 3.3

    def broken(x):
        raise RuntimeError("no kernel image is available for execution on the device")

    opdef = ops.OPS["_test_gate"]
    monkeypatch.setitem(opdef._resolved, "triton", wrong)
    monkeypatch.setitem(opdef._resolved, "cuda_cpp", broken)
    rows = _tune({"compiled-reference": 1.0, "triton": 0.1, "cuda_cpp": 0.1})
    assert opdef.device_backend("cuda", GPU) is None
    by = {(r["case"], r["backend"]): r for r in rows}
    assert "relative error" in by[("a", "triton")]["error"]
    assert "no kernel image" in by[("a", "cuda_cpp")]["error"]
    assert by[("b", "cuda_cpp")]["error"] == "failed at an earlier case"
    assert by[("a", "compiled-reference")]["chosen"]


def test_a_kernel_that_takes_no_timed_input_is_not_dispatched(gpu, monkeypatch):
    opdef = ops.OPS["_test_gate"]
    monkeypatch.setitem(opdef._resolved, "triton", lambda x: NotImplemented)
    _tune({"compiled-reference": 1.0, "triton": 0.1, "cuda_cpp": 0.5})
    entry = kernel_gate.read_table()["FAKE GPU | fastflow test"]["_test_gate"]
    assert entry["candidates"]["triton"] == "took none of the timed inputs"
    assert opdef.device_backend("cuda", GPU) == "cuda_cpp"


@pytest.mark.parametrize(
    "entry",
    [
        [],
        {"backend": "triton"},
        {"backend": "triton", "speedup": 2.0, "reference_ms": 1.0, "candidates": {"triton": [2.0]}},
        {"backend": "triton", "speedup": 2.0, "reference_ms": 1.0, "candidates": {"triton": "lost"}},
        {"backend": "triton", "speedup": "fast", "reference_ms": 1.0, "candidates": {"triton": 2.0}},
        {"backend": "triton", "speedup": 2.0, "reference_ms": 1.0, "candidates": {"triton": 2.0}, "x": 1},
        {"backend": "reference", "speedup": 1.0, "reference_ms": 1.0, "candidates": {"triton": "x" * 201}},
    ],
)
def test_a_kernel_table_of_the_wrong_shape_is_ignored_with_one_warning(gpu, caplog, entry):
    (gpu / "kernels.json").write_text(json.dumps({"FAKE GPU | fastflow test": {"_test_gate": entry}}))
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert ops.OPS["_test_gate"].device_backend("cuda", GPU) == "triton"  # as if untuned
    warned = [r for r in caplog.records if "kernel tuning table" in r.getMessage()]
    assert len(warned) == 1 and "fastflow tune" in warned[0].getMessage()


def test_a_huge_or_deep_kernel_table_is_ignored(gpu, caplog):
    (gpu / "kernels.json").write_text("[" * 50 + "]" * 50)
    assert kernel_gate.read_table() == {}
    with open(gpu / "kernels.json", "wb") as f:
        f.truncate(tune_table.MAX_TABLE_BYTES + 1)
    assert kernel_gate.read_table() == {}
    assert caplog.text.count("kernel tuning table") == 2


def test_tune_keeps_other_ops_and_machines_and_refuses_an_unsafe_folder(gpu):
    other = {"backend": "reference", "speedup": 1.0, "reference_ms": 1.0, "candidates": {"triton": "lost"}}
    (gpu / "kernels.json").write_text(json.dumps({"another GPU": {"geglu": other}}))
    _tune({"compiled-reference": 1.0, "triton": 0.5, "cuda_cpp": 2.0})
    table = kernel_gate.read_table()
    assert table["another GPU"] == {"geglu": other} and table["FAKE GPU | fastflow test"]["_test_gate"]
    gpu.chmod(0o777)
    with pytest.raises(UnsafeCacheError, match="writable by group or others"):
        _tune({"compiled-reference": 1.0, "triton": 0.5, "cuda_cpp": 2.0})


def test_every_op_with_a_kernel_has_timed_inputs_that_its_reference_takes():
    """Every op with a kernel but attention (tuned on its own) is timed; each case is a valid call."""
    small = cases(small=True)
    with_kernels = {n for n, o in ops.OPS.items() if o.impls and not n.startswith("_test")}
    assert set(small) == with_kernels - {"attention"}
    assert set(cases()) == set(small)
    with ops.use_backend("reference"):
        for name, op_cases in small.items():
            for case in op_cases:
                ops.OPS[name].call(*case.make(torch.device("cpu")))


def test_the_check_compares_every_output_with_the_reference():
    x = torch.randn(16, 16)
    tune_ops.check_close((x, x.to(torch.bfloat16)), (x, x.to(torch.bfloat16)), "same")
    for out, match in [
        ((x,), "1 outputs"),
        ((x, x), "output 1 is"),
        ((x * 1.1, x.to(torch.bfloat16)), "relative error"),
        ((x.clone().fill_(float("nan")), x.to(torch.bfloat16)), "non-finite"),
    ]:
        with pytest.raises(ArithmeticError, match=match):
            tune_ops.check_close(out, (x, x.to(torch.bfloat16)), "op")


def test_the_machine_key_names_fastflow_too():
    assert f"fastflow {tune_table.fastflow_version()}" in tune_table.machine_key(torch.device("cpu"))


def test_the_cli_tune_names_unknown_ops(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(tune_ops, "default_cases", lambda: cases(small=True))
    from fastflow.cli import main

    assert main(["tune", "--ops", "nope"]) == 2
    assert "no kernel timing for ops ['nope']" in capsys.readouterr().err


def test_without_a_table_every_op_keeps_its_kernel_silently(gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel_gate.won("_test_gate", GPU) is None
        assert ops.OPS["_test_gate"].device_backend("cuda", GPU) == "triton"
