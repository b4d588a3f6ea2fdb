"""Fuzz surface ``cache`` (CPU only; NVRTC is faked): the cache root from the environment (empty,
relative, a 0777 folder, a folder of another owner), the NVRTC cubin cache
(fastflow.ops.nvrtc.cubin: planted, truncated or emptied entries, a symlink planted at the
temporary name) and the attention tuning table (fastflow.ops.attention_backends: JSON of wrong
shapes, deep JSON, a FIFO, a symlink to /dev/zero, a symlink planted at ``fastflow tune``'s
temporary name).

Outcomes: ``write_outside`` when a planted symlink's target changes or a file appears in the
current folder; ``mismatch`` when a planted / truncated cubin is returned as is, or a cache root
writable by others or owned by another user is used; ``untyped`` / ``timeout`` as everywhere."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

FAKE = b"\x7fELF fake cubin "


def build_seeds(root: Path) -> None:
    pass


def _env(root: str) -> None:
    os.environ["FASTFLOW_CACHE_DIR"] = root


def _fake_nvrtc(nvrtc) -> None:
    nvrtc.version = lambda: (12, 4)
    nvrtc.compile_unit = lambda unit, arch: FAKE + f"{unit} {arch}".encode()


def _cubin_case(rng, work: Path, result: dict) -> None:
    from fastflow.ops import nvrtc

    _fake_nvrtc(nvrtc)
    unit = rng.choice(sorted(nvrtc.UNITS))
    root = work / "cache"
    _env(str(root))
    want = nvrtc.compile_unit(unit, "90")
    first = nvrtc.cubin(unit, "90")
    entries = [p for p in root.rglob("*") if p.is_file()]
    op = rng.choice(["planted", "truncated", "empty", "symlink_tmp", "symlink_entry"])
    result["desc"] = f"cubin cache, {unit}: {op}"
    outside = work / "outside.bin"
    outside.write_bytes(b"precious")
    for p in entries:
        if op == "planted":
            p.write_bytes(b"\x7fELF planted code")
        elif op == "truncated":
            p.write_bytes(p.read_bytes()[: max(1, len(p.read_bytes()) // 2)])
        elif op == "empty":
            p.write_bytes(b"")
        elif op == "symlink_tmp":
            p.unlink()
            p.with_suffix(f".tmp{os.getpid()}").symlink_to(outside)
        else:
            p.unlink()
            p.symlink_to(outside)
    got = nvrtc.cubin(unit, "90")
    if outside.read_bytes() != b"precious":
        result.update(outcome="write_outside", error="the planted symlink's target was overwritten")
    elif first != want or got != want:
        result.update(outcome="mismatch", error=f"cubin() returned {got[:24]!r}, not the compiled image")
    else:
        result["outcome"] = "ok"


def _table_case(rng, work: Path, result: dict) -> None:
    import torch

    from fastflow.ops import attention_backends as ab

    root = work / "cache"
    root.mkdir(mode=0o700)
    _env(str(root))
    path = ab.table_path()
    machine = ab.machine_key(torch.device("cpu"))
    key = ab.entry_key(8, torch.float32)
    outside = work / "outside.json"
    outside.write_text("precious")
    op = rng.choice(["shape", "shape", "deep", "fifo", "zero", "tune_tmp", "valid"])
    if op == "shape":
        data = rng.choice([[], 5, "x", {machine: 5}, {machine: []}, {machine: {key: 5}}, {machine: {key: []}},
                           {machine: {key: {"backend": 5}}}, {machine: {key: {"backend": ["sdpa"]}}}])  # fmt: skip
        path.write_text(json.dumps(data))
        result["desc"] = f"attention table {json.dumps(data)[:80]}"
    elif op == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
        result["desc"] = "attention table 100000-deep"
    elif op == "fifo":
        os.mkfifo(path)
        result["desc"] = "attention table is a FIFO"
    elif op == "zero":
        path.symlink_to("/dev/zero")
        result["desc"] = "attention table -> /dev/zero"
    elif op == "valid":
        path.write_text(json.dumps({machine: {key: {"backend": "sdpa", "ms": 1.0}}}))
        result["desc"] = "a valid attention table"
    else:
        path.with_suffix(".tmp").symlink_to(outside)
        result["desc"] = "symlink planted at the tune temporary"
        ab.tune("cpu", shapes={"s": (1, 8, 16)}, dtypes=(torch.float32,), timer=lambda fn: 1.0)
        result["outcome"] = "write_outside" if outside.read_text() != "precious" else "ok"
        if result["outcome"] == "write_outside":
            result["error"] = "tune wrote through a planted symlink"
        return
    ab.forget()
    q = torch.randn(1, 2, 16, 8)
    out = ab.attention(q, q, q, None)
    result["outcome"] = "ok" if bool(torch.isfinite(out).all()) else "nonfinite"


def _root_case(rng, work: Path, result: dict) -> None:
    from fastflow.ops import nvrtc

    _fake_nvrtc(nvrtc)
    cwd = work / "cwd"
    cwd.mkdir()
    op = rng.choice(["empty", "relative", "0777", "owner"])
    value = {"empty": "", "relative": "cachedir", "0777": str(work / "open"), "owner": str(work / "theirs")}[op]
    if op == "0777":
        Path(value).mkdir()
        os.chmod(value, 0o777)
    elif op == "owner":
        Path(value).mkdir(mode=0o700)
        if os.getuid() == 0:
            os.chown(value, 65534, 65534)
            os.chmod(value, 0o777)
        else:
            op = "0777"
            os.chmod(value, 0o777)
    result["desc"] = f"cache root {op}: {value!r}"
    _env(value)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        nvrtc.cubin(rng.choice(sorted(nvrtc.UNITS)), "90")
    finally:
        os.chdir(old)
    if any(cwd.iterdir()):
        result.update(outcome="write_outside", error="the cache was written into the current folder")
    elif op in ("0777", "owner") and any(Path(value).rglob("*")):  # skipped with a warning is fine: never used
        result.update(outcome="mismatch", error="a cache folder writable by others / of another owner was used")
    else:
        result["outcome"] = "ok"


def run_case(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    from fuzz_common import judge_exception

    surface, index = case
    rng = random.Random(f"{seed}/{surface}/{index}")
    result = {"case": index, "surface": surface}
    work.mkdir(parents=True)
    saved = {k: os.environ.get(k) for k in ("FASTFLOW_CACHE", "FASTFLOW_CACHE_DIR")}
    try:
        rng.choice([_cubin_case, _cubin_case, _table_case, _table_case, _root_case])(rng, work, result)
    except Exception as e:  # noqa: BLE001 - the point of the fuzzer
        result.update(judge_exception(e))
        if result["outcome"] == "typed" and result.get("desc") == "a valid attention table":
            result["outcome"] = "refused_valid"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return result
