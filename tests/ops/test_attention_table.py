"""The attention tuning table is read like a stranger's file: a table of the wrong shape, too deep,
too large, a FIFO or a device is ignored with one warning (the default order runs), never raised
inside an attention call, never hung on; `fastflow tune` writes it without following symlinks."""

import json
import os
import threading

import pytest
import torch

from fastflow.errors import InputError, UnsafeCacheError
from fastflow.ops import attention_backends as ab
from fastflow.ops import cache_root

Q = torch.randn(1, 2, 8, 80, dtype=torch.bfloat16)  # no FA3 or Triton on CPU: the default order ends at sdpa


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(root))
    monkeypatch.delenv("FASTFLOW_CACHE", raising=False)
    monkeypatch.setattr(cache_root, "_warned", set(), raising=False)
    ab.forget()
    yield root
    ab.forget()


def _machine():
    return ab.machine_key(torch.device("cpu"))


def _choose_warns(caplog) -> None:
    with caplog.at_level("WARNING"):
        assert ab.choose(Q, Q, Q).name == "sdpa"
        assert ab.choose(Q, Q, Q).name == "sdpa"
    warned = [r for r in caplog.records if "attention tuning table" in r.getMessage()]
    assert len(warned) == 1 and "fastflow tune" in warned[0].getMessage()


@pytest.mark.parametrize(
    "table",
    [
        [],
        "fa3",
        {"MACHINE": []},
        {"MACHINE": {"80/bfloat16": "fa3"}},
        {"MACHINE": {"80/bfloat16": {"backend": ["fa3"]}}},
        {"MACHINE": {"80/bfloat16": {"backend": "fa3", "ms": "fast"}}},
        {"MACHINE": {"80/bfloat16": {"backend": "fa3", "ms": 1.0, "extra": 1}}},
        {"MACHINE": {"80/bfloat16": None}},
    ],
)
def test_a_table_of_the_wrong_shape_is_ignored_with_one_warning(table_dir, caplog, table):
    text = json.dumps(table).replace("MACHINE", _machine())
    (table_dir / "attention.json").write_text(text)
    _choose_warns(caplog)


def test_a_deep_table_is_ignored(table_dir, caplog):
    (table_dir / "attention.json").write_text("[" * 100_000 + "]" * 100_000)
    _choose_warns(caplog)


def test_a_huge_table_is_ignored_unread(table_dir, caplog):
    with open(table_dir / "attention.json", "wb") as f:
        f.truncate(ab.MAX_TABLE_BYTES + 1)
    _choose_warns(caplog)


def test_a_table_behind_a_symlink_to_a_device_is_never_read(table_dir, caplog):
    (table_dir / "attention.json").symlink_to("/dev/zero")
    _choose_warns(caplog)


def test_a_fifo_table_does_not_hang(table_dir, caplog):
    os.mkfifo(table_dir / "attention.json")
    result = []
    with caplog.at_level("WARNING"):
        worker = threading.Thread(target=lambda: result.append(ab.choose(Q, Q, Q).name), daemon=True)
        worker.start()
        worker.join(10)
    assert not worker.is_alive() and result == ["sdpa"]
    assert "attention tuning table" in caplog.text


def test_a_folder_others_can_write_is_ignored_by_attention_and_refused_by_tune(table_dir, caplog, monkeypatch):
    key = _machine()
    (table_dir / "attention.json").write_text(json.dumps({key: {"80/bfloat16": {"backend": "gone", "ms": 1.0}}}))
    table_dir.chmod(0o777)
    with pytest.warns(RuntimeWarning, match="writable by group or others") as warned:
        assert ab.choose(Q, Q, Q).name == "sdpa"
        ab.forget()
        assert ab.choose(Q, Q, Q).name == "sdpa"  # read again: still one warning for the folder
    assert len(warned) == 1
    monkeypatch.setattr(ab, "BACKENDS", {"sdpa": ab.BACKENDS["sdpa"]})
    with pytest.raises(UnsafeCacheError, match="writable by group or others"):
        ab.tune("cpu", {"a": (1, 16, 8)}, dtypes=(torch.float32,), timer=lambda fn: 1.0)


def test_tune_never_follows_a_planted_temporary(table_dir, tmp_path, monkeypatch):
    """The old write went to the fixed ``attention.tmp``: a symlink there clobbered its target."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (table_dir / "attention.tmp").symlink_to(victim)
    (table_dir / "attention.json").symlink_to(tmp_path / "victim2")
    monkeypatch.setattr(ab, "BACKENDS", {"sdpa": ab.BACKENDS["sdpa"]})
    ab.tune("cpu", {"a": (1, 16, 8)}, dtypes=(torch.float32,), timer=lambda fn: 1.0)
    assert victim.read_text() == "precious" and not (tmp_path / "victim2").exists()
    table = table_dir / "attention.json"
    assert not table.is_symlink() and json.loads(table.read_text())[_machine()]["16/float32"]["backend"] == "sdpa"
    assert ab.read_table()[_machine()]["16/float32"] == {"backend": "sdpa", "ms": 1.0, "speedup": 1.0}


def test_a_relative_cache_root_is_refused_by_tune(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", "cache")
    monkeypatch.setattr(ab, "BACKENDS", {"sdpa": ab.BACKENDS["sdpa"]})
    with pytest.raises(InputError, match="FASTFLOW_CACHE_DIR='cache' is not an absolute path"):
        ab.tune("cpu", {"a": (1, 16, 8)}, dtypes=(torch.float32,), timer=lambda fn: 1.0)
    assert list(tmp_path.iterdir()) == []
