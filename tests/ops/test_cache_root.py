"""fastflow's on-disk cache never trusts the disk: one absolute root, only the user's own 0700
folder, cubins checked before use, writes that never follow a planted symlink (no GPU, no NVRTC:
the compiler is a fake, the file handling is real)."""

import errno
import hashlib
import os
import stat
import warnings

import pytest
import torch

from fastflow.errors import InputError, UnsafeCacheError
from fastflow.ops import cache_root, nvrtc

FAKE_CUBIN = b"\x7fELF" + b"\x01" * 300


@pytest.fixture
def compiled(monkeypatch):
    """nvrtc with a fake compiler (counts its calls) and a fixed NVRTC version."""
    calls = []
    monkeypatch.setattr(nvrtc, "compile_unit", lambda u, a: calls.append((u, a)) or FAKE_CUBIN)
    monkeypatch.setattr(nvrtc, "version", lambda: (12, 9))
    monkeypatch.delenv("FASTFLOW_CACHE", raising=False)
    monkeypatch.delenv("FASTFLOW_CACHE_DIR", raising=False)
    monkeypatch.setattr(cache_root, "_warned", set(), raising=False)
    return calls


@pytest.fixture
def root(tmp_path, monkeypatch, compiled):
    path = tmp_path / "cache"
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(path))
    return path


def _entry(root):
    (entry,) = (p for p in (root / "cubin").iterdir() if p.name.endswith(".cubin"))
    return entry


# -- the root -------------------------------------------------------------------------------------
@pytest.mark.parametrize("env", ["FASTFLOW_CACHE_DIR"])
@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_an_empty_or_relative_root_is_refused(tmp_path, monkeypatch, compiled, env, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(InputError, match=f"{env}=.*not an absolute path"):
            nvrtc.cubin("groupnorm_silu", "89")
    assert list(tmp_path.iterdir()) == []  # nothing written in the current folder


def test_the_root_and_its_subfolder_are_created_owner_only(root):
    old = os.umask(0o022)
    try:
        nvrtc.cubin("groupnorm_silu", "89")
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "cubin").stat().st_mode) == 0o700


def test_one_cache_variable_the_old_one_is_not_read(tmp_path, monkeypatch, compiled):
    """FASTFLOW_CACHE is no longer an alias (one warning says so); never an error in an op."""
    monkeypatch.setenv("FASTFLOW_CACHE", str(tmp_path / "old"))
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", str(tmp_path / "new"))
    with pytest.warns(RuntimeWarning, match="FASTFLOW_CACHE is no longer read: set FASTFLOW_CACHE_DIR") as warned:
        assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
        assert nvrtc.cubin("groupnorm_silu", "90") == FAKE_CUBIN
    assert len(warned) == 1
    assert not (tmp_path / "old").exists() and len(list((tmp_path / "new" / "cubin").iterdir())) == 2


@pytest.fixture
def unreachable(tmp_path, monkeypatch, compiled):
    """A cache root this user may not search or write (a ``$HOME`` of another user, a read-only
    mount): every look at a path under ``locked`` fails with EACCES, as it would for a non-root user
    (these tests may run as root, which permission bits do not stop)."""
    locked = str(tmp_path / "locked")
    monkeypatch.setenv("FASTFLOW_CACHE_DIR", locked + "/home/.cache/fastflow")

    def deny(real):
        def call(path, *args, **kwargs):
            if os.fspath(path).startswith(locked):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    for name in ("stat", "lstat", "mkdir", "open", "listdir", "scandir"):
        monkeypatch.setattr(os, name, deny(getattr(os, name)))
    return locked


def test_an_unreachable_cache_folder_warns_once_and_the_ops_run_uncached(unreachable, compiled):
    from fastflow.ops import attention_backends as ab

    q = torch.randn(1, 2, 8, 80, dtype=torch.bfloat16)
    ab.forget()
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            for _ in range(2):  # the tuning tables: attention's choice (PermissionError before), the kernel gate
                assert ab.choose(q, q, q).name == "sdpa"
                from fastflow.ops import kernel_gate

                kernel_gate.forget()
                assert kernel_gate.read_table() == {}
                ab.forget()
        tables = [w for w in warned if "running without the tuning tables" in str(w.message)]
        assert len(tables) == 1 and "Permission denied" in str(tables[0].message)
        with pytest.warns(UserWarning, match="compiling without the cache") as warned:
            for _ in range(2):  # the NVRTC cubin cache
                assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
        assert len(warned) == 1 and len(compiled) == 2  # compiled each time: nothing cached
    finally:
        ab.forget()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_folder_others_can_write_is_never_used(root, compiled, mode):
    nvrtc.cubin("groupnorm_silu", "89")
    entry = _entry(root)
    (root / "cubin").chmod(mode)
    entry.write_bytes(b"planted")  # anyone could have written it
    with pytest.warns(UserWarning, match="writable by group or others.*chmod 700"):
        assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
    assert entry.read_bytes() == b"planted" and len(compiled) == 2  # compiled, not read or written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per folder, not at every compile
        nvrtc.cubin("groupnorm_silu", "80")


def test_a_folder_of_another_user_is_never_used(root, compiled, monkeypatch):
    root.mkdir(mode=0o700)
    monkeypatch.setattr(cache_root.os, "getuid", lambda: os.stat(root).st_uid + 1)
    with pytest.raises(UnsafeCacheError, match="owned by another user"):
        with cache_root.folder():
            pass
    with pytest.warns(UserWarning, match="owned by another user"):
        nvrtc.cubin("groupnorm_silu", "89")
    assert not (root / "cubin").exists()


def test_a_symlinked_subfolder_is_refused(root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    root.mkdir(mode=0o700)
    (root / "cubin").symlink_to(elsewhere)
    with pytest.warns(UserWarning, match="symlink"):
        nvrtc.cubin("groupnorm_silu", "89")
    assert list(elsewhere.iterdir()) == []


# -- entries ----------------------------------------------------------------------------------------
def test_an_entry_is_used_only_after_its_digest_checks(root, compiled):
    assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
    assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN and len(compiled) == 1  # served from disk
    entry = _entry(root)
    whole = entry.read_bytes()
    for bad in (
        whole[:-7],  # truncated
        b"\x7fELF planted code",  # planted, no digest
        whole[: -len(FAKE_CUBIN)] + b"\x7fELF" + b"\x02" * 300,  # the cubin swapped, the digest kept
        nvrtc.MAGIC + hashlib.sha256(b"other-key" + FAKE_CUBIN).digest() + FAKE_CUBIN,  # another key's
    ):
        entry.write_bytes(bad)
        n = len(compiled)
        assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
        assert len(compiled) == n + 1  # recompiled, never launched from the bad entry
        assert entry.read_bytes() == whole  # and rewritten


@pytest.mark.parametrize("kind", ["symlink", "fifo", "huge"])
def test_an_entry_that_is_not_a_small_regular_file_is_recompiled_over(root, compiled, tmp_path, kind):
    nvrtc.cubin("groupnorm_silu", "89")
    entry = _entry(root)
    whole = entry.read_bytes()
    entry.unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(whole)  # a valid entry, but behind a symlink the user did not make
    if kind == "symlink":
        entry.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        with open(entry, "wb") as f:
            f.truncate(nvrtc.MAX_CUBIN_BYTES + 1)
    assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN and len(compiled) == 2
    assert entry.is_file() and not entry.is_symlink() and entry.read_bytes() == whole
    assert victim.read_bytes() == whole  # the symlink was replaced, not followed


def test_writes_never_follow_a_planted_temporary(root, compiled, tmp_path):
    """The old write went to ``<entry>.tmp<pid>``: a symlink planted there clobbered its target."""
    nvrtc.cubin("groupnorm_silu", "89")
    entry = _entry(root)
    entry.unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (root / "cubin" / f"{entry.stem}.tmp{os.getpid()}").symlink_to(victim)
    nvrtc.cubin("groupnorm_silu", "89")
    assert victim.read_bytes() == b"precious"
    assert [p.name for p in (root / "cubin").iterdir() if p.name.startswith(".")] == []  # no leftover


def test_write_entry_is_atomic_and_exclusive(tmp_path):
    tmp_path.chmod(0o700)
    with cache_root.folder(base=tmp_path) as (fd, where):
        cache_root.write_entry(fd, "x", b"one")
        cache_root.write_entry(fd, "x", b"two")
        assert cache_root.read_entry(fd, where / "x", 10) == b"two"
        assert cache_root.read_entry(fd, where / "missing", 10) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_full_disk_still_returns_the_compiled_cubin(root, compiled, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_root, "write_entry", full)
    assert nvrtc.cubin("groupnorm_silu", "89") == FAKE_CUBIN
