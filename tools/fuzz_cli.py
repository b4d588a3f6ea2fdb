"""Fuzz surface ``cli``: ``fastflow generate`` (in the worker, through fastflow.cli.main) with
``--from IMG`` whose PNG / JPEG / WebP metadata is mutated (types, sizes, escape sequences, zTXt
bombs, huge headers), FIFOs / devices / folders as file arguments, ``--config`` junk, long ``-o``
names and ``-p`` with several prompts.

Outcomes: exit 0 or 2 pass (``ok`` / ``typed``); exit 1, a traceback or an escaping exception is
``untyped``; a hang is ``timeout``; a planted escape sequence printed raw is ``unsafe_print``; any
file created outside the asked output path is ``write_outside``; the JPEG / WebP fastflow wrote
refused by ``--from`` is ``refused_valid``; ``-p A B`` that makes one image is ``ignored``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path

MARK = "\x1b]0;FUZZ\x07\x1b[2J"


def build_seeds(root: Path) -> None:
    from fastflow.cli import main

    for ext in ("png", "jpg", "webp"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main(["generate", "a seven", "--seed", "3", "--steps", "2", "-o", str(root / f"seed.{ext}")])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _mutated_png(rng: random.Random, seed_png: Path, out: Path) -> str:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    im = Image.open(seed_png)
    info = dict(im.info)
    settings = json.loads(info["settings"])
    op = rng.randrange(8)
    if op == 0:
        key = rng.choice(sorted(settings))
        settings[key] = rng.choice([None, "x", -1, 0, 10**6, 1.5, [], {}, True, MARK, "1e400", 2**70])
        desc = f"settings.{key} = {settings[key]!r}"
        info["settings"] = json.dumps(settings)
    elif op == 1:
        key = rng.choice(["prompt", "seed", "settings", "parameters"])
        info[key] = rng.choice([MARK, "", "x" * 100_000, "{", "[]", "null", "-5", "1" * 400, "\x00"])
        desc = f"{key} = {info[key][:20]!r}"
    elif op == 2:
        settings["model"] = "fastflow-tiny-digits" + MARK
        info["settings"] = json.dumps(settings)
        desc = "settings.model with an escape sequence"
    elif op == 3:
        del info[rng.choice(["prompt", "seed", "settings"])]
        desc = "a metadata field removed"
    if op in (0, 1, 2, 3):
        png = PngInfo()
        for k, v in info.items():
            if isinstance(v, str):
                png.add_text(k, v)
        im.save(out, pnginfo=png)
        return desc
    raw = seed_png.read_bytes()
    iend = raw.rindex(b"IEND") - 4
    if op == 4:  # a zTXt bomb: 200 MB of zeros
        bomb = b"settings\x00\x00" + zlib.compress(b"0" * (200 * 2**20), 9)
        out.write_bytes(raw[:iend] + _png_chunk(b"zTXt", bomb) + raw[iend:])
        return "zTXt bomb (200 MB)"
    if op == 5:  # a huge header
        ihdr = (100_000).to_bytes(4, "big") * 2 + raw[24:29]
        out.write_bytes(raw[:8] + _png_chunk(b"IHDR", ihdr) + raw[33:])
        return "IHDR 100000 x 100000"
    if op == 6:
        out.write_bytes(raw[: rng.randrange(8, len(raw))])
        return "truncated PNG"
    text = rng.choice([b"settings\x00\xff\xfe{", b"prompt\x00" + MARK.encode(), b"\x00\x00", b"seed\x00" + b"9" * 5000])
    out.write_bytes(raw[:iend] + _png_chunk(b"tEXt", text) + raw[iend:])
    return f"raw tEXt {text[:16]!r}"


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            with contextlib.suppress(OSError):
                st = p.lstat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def run_case(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    from fastflow.cli import main

    surface, index = case
    rng = random.Random(f"{seed}/{surface}/{index}")
    result = {"case": index, "surface": surface}
    cwd, tmp, inputs = work / "cwd", work / "tmp", work / "in"
    for d in (cwd, tmp, inputs):
        d.mkdir(parents=True)
    out = cwd / "out"
    out.mkdir()
    target = out / "image.png"
    argv = ["generate", "--steps", "2"]
    op = rng.choice(["png", "png", "png", "valid", "special", "config", "long", "prompts"])
    if op == "png":
        img = inputs / "in.png"
        result["desc"] = "--from PNG: " + _mutated_png(rng, seeds_root / "seed.png", img)
        argv += ["--from", str(img)]
    elif op == "valid":
        ext = rng.choice(["png", "jpg", "webp"])
        shutil.copy(seeds_root / f"seed.{ext}", inputs / f"in.{ext}")
        argv += ["--from", str(inputs / f"in.{ext}")]
        result["desc"] = f"--from the {ext} fastflow wrote"
    elif op == "special":
        which = rng.choice(["fifo", "dev", "dir"])
        path = {"fifo": inputs / "fifo.png", "dev": Path("/dev/zero"), "dir": inputs}[which]
        if which == "fifo":
            os.mkfifo(path)
        flag = rng.choice(["--from", "--config", "--image"])
        argv += ["a seven", flag, str(path)]
        result["desc"] = f"{flag} {which}"
    elif op == "config":
        text = rng.choice(['{"num_heads": 0}', '{"depth": Infinity}', "[" * 5000, '{"depth": [' + "1," * 20000 + "1]}",
                           '{"depth": 2', "null", '{"\xe9": 1}', '{"hidden_size": -1}'])  # fmt: skip
        if rng.random() < 0.5:
            (inputs / "c.json").write_bytes(text.encode("latin-1", "replace"))
            text = str(inputs / "c.json")
        argv += ["a seven", "--config", text]
        result["desc"] = f"--config {text[:40]!r}"
    elif op == "long":
        target = out / (rng.choice(["x" * 300, "y" * 250, "é" * 130]) + ".png")
        argv += ["a seven"]
        result["desc"] = f"-o with a {len(target.name)}-character name"
    else:
        argv += ["-p", "a seven", "a three"]
        target = out
        result["desc"] = "-p with two prompts"
    argv += ["-o", str(target)]
    tempfile.tempdir, old_cwd = str(tmp), os.getcwd()
    before = _snapshot(work)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException as e:  # noqa: BLE001 - the point of the fuzzer: nothing may escape main
        result.update(outcome="untyped", error=f"escaped main: {type(e).__name__}: {e}"[:300])
        return result
    finally:
        os.chdir(old_cwd)
        tempfile.tempdir = None
    text = stdout.getvalue() + stderr.getvalue()
    after = _snapshot(work)
    asked = str(target) if target != out else str(out)
    new = [p for p in after if p not in before and not p.startswith(asked) and p != str(out)]
    if rc == 1 or "Traceback" in text:
        result.update(outcome="untyped", error=text.strip().splitlines()[-1][:300] if text.strip() else f"exit {rc}")
    elif MARK in text or "\x1b]0;FUZZ" in text:
        result.update(outcome="unsafe_print", error="an escape sequence from the file reached the output raw")
    elif new:
        result.update(outcome="write_outside", error=f"new files: {new[:3]}")
    elif op == "valid" and rc != 0:
        result.update(outcome="refused_valid", error=text.strip()[-200:])
    elif op == "prompts" and rc == 0 and len(list(out.iterdir())) < 2:
        result.update(outcome="ignored", error="-p A B made one image")
    else:
        result.update(outcome="ok" if rc == 0 else "typed", error=text.strip()[-200:] if rc else "")
    return result
