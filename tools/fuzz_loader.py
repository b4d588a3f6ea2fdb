"""Fuzz fastflow's loaders with mutated checkpoints; fail on anything but a typed error or a
faithful load.

Seeds (built with random weights at start): a FLUX file in official names, a sharded FLUX folder
(index.json), a VAE folder with config.json, the embedded model's CLIP and T5 folders, and the
embedded pipeline folder. Each case copies one seed and mutates one file: the safetensors header
(field types and values, entries, metadata, nesting), its length prefix (including valid re-pads
to 128 mod 256), the tensor bytes, truncation or appended bytes, a JSON file (config, index,
model_index), or the file system (a directory, FIFO or outside symlink in the file's place).

Outcomes: ``ok`` (the load succeeded and equals, bit for bit, loading a clean re-save of the same
tensors made with the safetensors library), ``typed`` (a FastflowError), and the failures
``untyped`` (any other exception), ``mismatch`` (loaded, but not the re-saved tensors, or
safetensors itself refuses a file we accepted), ``timeout`` and ``memory`` (over the cap).
Cases run in a worker process with a per-case time limit and an address-space cap.

    python tools/fuzz_loader.py --cases 300            # CI budget, < 2 min on 2 cores
    python tools/fuzz_loader.py --cases 3000 --seed 1  # on demand
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_common import Runner, peak_rss, peak_rss_reset  # noqa: E402

FAILURES = ("untyped", "mismatch", "timeout", "memory")
SEEDS = ("flux_file", "flux_sharded", "fp8_file", "vae_folder", "clip_folder", "t5_folder", "pipeline")
SEED_WEIGHTS = (4, 2, 2, 2, 2, 2, 1)  # the pipeline seed loads everything, so it is the slowest
KINDS = ("header", "prefix", "data", "truncate", "json", "fs")
KIND_WEIGHTS = (8, 2, 2, 2, 3, 1)


# -- seeds ---------------------------------------------------------------------------------------
def build_seeds(root: Path) -> None:
    """Write every seed folder under ``root`` (deterministic random weights)."""
    import torch
    from safetensors.torch import save_file

    from fastflow.loading import DEFAULT_MODEL
    from fastflow.models import AutoEncoder, Flux, from_name

    torch.manual_seed(0)
    flux = {k: v.contiguous() for k, v in Flux(from_name("flux-tiny-dev")).state_dict().items()}
    (root / "flux_file").mkdir(parents=True)
    save_file(flux, str(root / "flux_file" / "model.safetensors"), metadata={"fastflow.variant": "flux-tiny-dev"})

    fp8 = {}  # ComfyUI-style scaled FP8: prefixed e4m3 linear weights, scale_weight, a scale_input, marker
    prefix = "model.diffusion_model."
    for k, v in flux.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448
            fp8[prefix + k], fp8[prefix + k[: -len("weight")] + "scale_weight"] = (
                (v / scale).to(torch.float8_e4m3fn),
                scale,
            )
        else:
            fp8[prefix + k] = v
    fp8[prefix + "final_layer.linear.scale_input"] = torch.tensor(0.05)
    fp8[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    (root / "fp8_file").mkdir()
    save_file(fp8, str(root / "fp8_file" / "model.safetensors"), metadata={"fastflow.variant": "flux-tiny-dev"})

    sharded = root / "flux_sharded"
    sharded.mkdir()
    keys = sorted(flux)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in halves.items():
        save_file({k: flux[k] for k in part}, str(sharded / name), metadata={"fastflow.variant": "flux-tiny-dev"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    vae = root / "vae_folder"
    vae.mkdir()
    weights = {k: v.contiguous() for k, v in AutoEncoder(from_name("vae-tiny-flux")).state_dict().items()}
    save_file(weights, str(vae / "diffusion_pytorch_model.safetensors"))
    (vae / "config.json").write_text(json.dumps({"scaling_factor": 0.3611, "shift_factor": 0.1159}))

    for seed, (model, tokenizer) in {
        "clip_folder": ("text_encoder", "tokenizer"),
        "t5_folder": ("text_encoder_2", "tokenizer_2"),
    }.items():
        shutil.copytree(DEFAULT_MODEL / model, root / seed)
        for f in (DEFAULT_MODEL / tokenizer).iterdir():
            shutil.copy(f, root / seed / f.name)
    shutil.copytree(DEFAULT_MODEL, root / "pipeline")


def _load(seed: str, folder: Path):
    """Load the seed's component from ``folder``; returns {name: tensor} of everything loaded."""
    import torch

    import fastflow
    from fastflow.loading import load_clip, load_t5

    f32 = torch.float32
    if seed in ("flux_file", "fp8_file"):
        path = folder / "model.safetensors"
        fastflow.inspect_checkpoint(path)
        return fastflow.load_transformer(path, dtype=f32).state_dict()
    if seed == "flux_sharded":
        fastflow.inspect_checkpoint(folder)
        return fastflow.load_transformer(folder, dtype=f32).state_dict()
    if seed == "vae_folder":
        vae = fastflow.load_vae(folder, dtype=f32)
        factors = torch.tensor([vae.config.scale_factor, vae.config.shift_factor], dtype=torch.float64)
        return {**vae.state_dict(), "latent_factors": factors}
    if seed == "clip_folder":
        return load_clip(folder, dtype=f32).model.state_dict()
    if seed == "t5_folder":
        return load_t5(folder, dtype=f32).model.state_dict()
    pipe = fastflow.load(folder, device="cpu", dtype=f32)
    state = {}
    for name, module in (("transformer", pipe.transformer), ("vae", pipe.vae)):
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    for role in ("clip_l", "t5"):
        encoder = getattr(pipe.text_encoder, role)
        state.update({f"{role}.{k}": v for k, v in encoder.model.state_dict().items()})
    return state


# -- mutations -----------------------------------------------------------------------------------
def _split(raw: bytes) -> tuple[dict, bytes] | None:
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        return json.loads(raw[8 : 8 + n]), raw[8 + n :]
    except ValueError:
        return None


def _join(header, data: bytes, pad_to: int = 8, text: str | None = None) -> bytes:
    body = (text if text is not None else json.dumps(header)).encode()
    body += b" " * (-len(body) % pad_to)
    return struct.pack("<Q", len(body)) + body + data


_WEIRD = [
    None,
    True,
    -1,
    0,
    1.5,
    2**70,
    -(2**70),
    "F32",
    "",
    "X9",
    [],
    [1],
    [[1]],
    {},
    {"a": 1},
    "1e400",
    10**30,
]
_RAW = ["Infinity", "-Infinity", "NaN", "1e400", "1" * 5000, "[" * 1500 + "]" * 1500, "[[[[[[[[[[1]]]]]]]]]]"]
_PREFIXES = ["model.diffusion_model.", "first_stage_model.", "text_encoders.clip_l.", "lora_unet_", "", "x."]


def _mutate_header(rng: random.Random, raw: bytes) -> bytes:
    parts = _split(raw)
    if parts is None:
        return raw[:8] + b"{" + raw[9:]
    header, data = parts
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.randrange(14)
    marker = "__FUZZ__"
    if op == 0:
        entry["dtype"] = rng.choice(_WEIRD + ["F16", "BF16", "I64", "U8", "F8_E4M3", "BOOL"])
    elif op == 1:
        shape = list(entry["shape"])
        choice = rng.randrange(7)
        if choice == 0 and shape:
            shape[rng.randrange(len(shape))] = rng.choice(_WEIRD)
        elif choice == 1:
            shape.append(rng.choice([0, 1, 2]))
        elif choice == 2 and shape:
            shape.pop(rng.randrange(len(shape)))
        elif choice == 3:
            shape = [0] * rng.randrange(1, 4)
        elif choice == 4:
            shape = rng.choice(_WEIRD)
        elif choice == 5 and shape:
            shape[0] = marker
        else:
            shape = list(reversed(shape))
        entry["shape"] = shape
    elif op == 2:
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(
            [
                [end, begin],
                [begin + 1, end],
                [begin, end + rng.choice([1, 8, 2**40])],
                [begin],
                rng.choice(_WEIRD),
                [marker, end],
                [begin, 2**64],
                [-8, end],
            ]
        )
    elif op == 3:
        del entry[rng.choice(list(entry))]
    elif op == 4:
        del header[name]
    elif op == 5:
        header[rng.choice(_PREFIXES) + name + rng.choice(["", ".x", "_extra"])] = dict(entry)
    elif op == 6:
        header[rng.choice(_PREFIXES) + name] = header.pop(name)
    elif op == 7:
        header["__metadata__"] = rng.choice(
            [
                {"a": rng.choice(_WEIRD)},
                [1, 2],
                "text",
                {"fastflow.variant": rng.choice(["flux-tiny-schnell", "nope", ""])},
                None,
            ]
        )
    elif op == 8:
        entry["extra"] = marker
    elif op == 9:  # empty tensors: many names, no data
        for i in range(rng.choice([10, 1000, 20000])):
            header[f"empty.{i}"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    elif op == 10:
        header = rng.choice([[], "x", 1, None, [header]])
    elif op == 11:
        entry["shape"] = [2**62, 2**62]
    elif op == 12:  # a random raw token in a random field
        entry[rng.choice(["shape", "data_offsets", "dtype"])] = marker
    else:  # shuffle order only: must still load
        header = dict(rng.sample(list(header.items()), len(header)))
    text = json.dumps(header)
    if marker in text:
        text = text.replace(f'"{marker}"', rng.choice(_RAW), 1)
    return _join(header, data, text=text)


def _mutate_prefix(rng: random.Random, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    choice = rng.randrange(5)
    if choice == 0:  # valid: re-pad so the length is 128 mod 256 (first byte 0x80)
        parts = _split(raw)
        body = raw[8 : 8 + n].rstrip(b" ")
        body += b" " * ((128 - len(body)) % 256)
        return struct.pack("<Q", len(body)) + body + parts[1]
    if choice == 1:
        return struct.pack("<Q", rng.getrandbits(64)) + raw[8:]
    if choice == 2:
        return struct.pack("<Q", max(0, n + rng.choice([-16, -8, -1, 1, 8, 16]))) + raw[8:]
    if choice == 3:
        return raw[:8] + raw[8:].replace(b"{", b"\x80\x04", 1)
    return struct.pack("<Q", rng.choice([0, 1, 2, 8, len(raw), 2**63])) + raw[8:]


def _mutate_data(rng: random.Random, raw: bytes) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    data = bytearray(raw)
    for _ in range(rng.randrange(1, 32)):
        if len(data) > 8 + n:
            data[rng.randrange(8 + n, len(data))] = rng.randrange(256)
    return bytes(data)


def _mutate_truncate(rng: random.Random, raw: bytes) -> bytes:
    if rng.random() < 0.3:
        return raw + bytes(rng.randrange(1, 64))
    return raw[: rng.randrange(0, len(raw))]


def _json_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:8]):
            yield from _json_paths(v, (*path, i))


def _mutate_json(rng: random.Random, text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError:
        return text[: len(text) // 2]
    choice = rng.randrange(6)
    if choice == 0:
        return text[: rng.randrange(len(text))]
    if choice == 1:
        return rng.choice(["[]", "null", "1", '"x"', "[" * 2000 + "]" * 2000, "{" + '"a":{' * 2000 + "}" * 2001])
    paths = [p for p in _json_paths(value) if p]
    if not paths:
        return json.dumps(rng.choice(_WEIRD))
    path = rng.choice(paths)
    parent = value
    for k in path[:-1]:
        parent = parent[k]
    if choice == 2 and isinstance(parent, dict):
        del parent[path[-1]]
        return json.dumps(value)
    marker = "__FUZZ__"
    parent[path[-1]] = rng.choice(
        _WEIRD + [10**9, 1e9, -5, 0, 10**6, marker, "../../../../etc/passwd", "/etc/hostname", "x.safetensors"]
    )
    out = json.dumps(value)
    return out.replace(f'"{marker}"', rng.choice(_RAW), 1)


def _mutate_fs(rng: random.Random, target: Path, case_dir: Path) -> None:
    choice = rng.randrange(5)
    target.unlink()
    if choice == 0:
        target.mkdir()
    elif choice == 1:
        os.mkfifo(target)
    elif choice == 2:
        outside = case_dir.parent / "outside.bin"
        outside.write_bytes(b"secret")
        target.symlink_to(outside)
    elif choice == 3:
        target.symlink_to("/dev/zero")
    else:  # a Hugging Face cache layout whose blobs/ leads to /
        target.symlink_to(target.name + ".missing")


def make_case(rng: random.Random, seeds_root: Path, case_dir: Path) -> tuple[str, str, str]:
    """Copy a seed into ``case_dir`` and mutate one of its files: (seed, kind, file)."""
    seed = rng.choices(SEEDS, SEED_WEIGHTS)[0]
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    shutil.copytree(seeds_root / seed, case_dir, symlinks=True)
    files = sorted(p for p in case_dir.rglob("*") if p.is_file())
    if kind == "json" and not any(p.suffix == ".json" for p in files):
        kind = "header"
    suffix = ".json" if kind == "json" else ".safetensors"
    target = rng.choice([p for p in files if p.suffix == suffix])
    if kind == "fs":
        _mutate_fs(rng, target, case_dir)
    elif kind == "json":
        target.write_text(_mutate_json(rng, target.read_text()))
    else:
        mutate = {
            "header": _mutate_header,
            "prefix": _mutate_prefix,
            "data": _mutate_data,
            "truncate": _mutate_truncate,
        }
        target.write_bytes(mutate[kind](rng, target.read_bytes()))
    return seed, kind, str(target.relative_to(case_dir))


# -- judging -------------------------------------------------------------------------------------
def _same(a: dict, b: dict) -> bool:
    import torch

    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            return False
    return True


def clean_resave(case_dir: Path, clean_dir: Path) -> None:
    """The same folder with every safetensors file re-written by the safetensors library."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(case_dir, clean_dir, symlinks=True)
    for path in sorted(clean_dir.rglob("*.safetensors")):
        if path.is_symlink() or not path.is_file():
            continue
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        path.unlink()
        save_file(tensors, str(path), metadata=metadata)


def run_case(index: int, seed: int, seeds_root: Path, work: Path) -> dict:
    """One case in this process: build, load, judge."""
    from fastflow.errors import FastflowError

    rng = random.Random(seed * 1_000_003 + index)
    case_dir = work / f"case{index}"
    result = {"case": index}
    try:
        result["seed"], result["kind"], result["file"] = make_case(rng, seeds_root, case_dir)
        peak_rss_reset()
        t0 = time.perf_counter()
        try:
            state = _load(result["seed"], case_dir)
        except FastflowError as e:
            result.update(outcome="typed", error=type(e).__name__)
        except MemoryError:
            result.update(outcome="memory", error="MemoryError")
        except Exception as e:  # noqa: BLE001 - the point of the fuzzer
            if "can't allocate memory" in str(e):
                result.update(outcome="memory", error=str(e)[:200])
                return result
            result.update(
                outcome="untyped", error=f"{type(e).__name__}: {e}"[:300], trace=traceback.format_exc()[-1500:]
            )
        else:
            try:
                clean_resave(case_dir, work / f"clean{index}")
                reference = _load(result["seed"], work / f"clean{index}")
            except Exception as e:  # noqa: BLE001
                result.update(
                    outcome="mismatch", error=f"accepted, but the clean re-save fails: {type(e).__name__}: {e}"[:300]
                )
            else:
                result.update(outcome="ok" if _same(state, reference) else "mismatch")
                if result["outcome"] == "mismatch":
                    result["error"] = "loaded tensors differ from a clean re-save's"
        result["seconds"] = round(time.perf_counter() - t0, 3)
        result["peak_rss"] = peak_rss()
    finally:
        shutil.rmtree(case_dir, ignore_errors=True)
        shutil.rmtree(work / f"clean{index}", ignore_errors=True)
    return result


def fuzz(cases: int, seed: int = 0, timeout: float = 30.0, memory_gb: float = 2.0, progress: bool = True) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fastflow-fuzz-") as tmp:
        root = Path(tmp)
        build_seeds(root / "seeds")
        (root / "work").mkdir()
        runner = Runner("fuzz_loader:run_case", (seed, root / "seeds", root / "work"), timeout, int(memory_gb * 2**30))
        results = []
        try:
            for i in range(cases):
                results.append(runner.run(i))
                if progress and (i + 1) % 100 == 0:
                    counts = collections.Counter(r["outcome"] for r in results)
                    print(f"{i + 1}/{cases} {dict(counts)}", file=sys.stderr, flush=True)
        finally:
            runner.close()
        return results


def summarize(results: list[dict], seconds: float) -> str:
    counts = collections.Counter(r["outcome"] for r in results)
    by_kind = collections.Counter((r.get("kind"), r["outcome"]) for r in results)
    peak = max((r.get("peak_rss", 0) for r in results), default=0)
    slowest = max((r.get("seconds", 0) for r in results), default=0)
    lines = [
        f"{len(results)} cases in {seconds:.0f} s: "
        + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("ok", "typed", *FAILURES)),
        f"slowest case {slowest:.2f} s, peak RSS of a case {peak / 2**20:.0f} MiB",
        "by mutation: " + ", ".join(f"{k}/{o} {n}" for (k, o), n in sorted(by_kind.items(), key=str)),
    ]
    for r in [r for r in results if r["outcome"] in FAILURES][:20]:
        lines.append(
            f"  FAIL case {r['case']} {r.get('seed')} {r.get('kind')} {r.get('file')}: "
            f"{r['outcome']} {r.get('error', '')}"
        )
        if r.get("trace"):
            lines.append("    " + r["trace"].strip().splitlines()[-3].strip())
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per case")
    parser.add_argument("--memory-gb", type=float, default=2.0, help="address-space cap per case")
    parser.add_argument("--json", default=None, help="write every case's result here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = fuzz(args.cases, args.seed, args.timeout, args.memory_gb)
    print(summarize(results, time.perf_counter() - t0))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["outcome"] in FAILURES for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
