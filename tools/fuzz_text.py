"""Fuzz surface ``text``: tokenizer folders (tokenizer.json; vocab.json + merges.txt) mutated
(deep JSON, non-UTF-8 bytes, merges naming unknown tokens, token ids beyond the embedding, huge
files, wrong types) and loaded with their CLIP encoder, which then encodes a prompt; and prompts
(huge, lone surrogates, control characters, non-str types, lists) given to the embedded model's
pipeline. ``ok`` needs finite embeddings / a finite image."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

_STATE: dict = {}


def _byte_chars() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_seeds(root: Path) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastflow.loading import DEFAULT_MODEL

    shutil.copytree(DEFAULT_MODEL / "text_encoder", root / "json" / "model")
    shutil.copytree(DEFAULT_MODEL / "tokenizer", root / "json" / "tokenizer")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": 256 + i for i, c in enumerate(chars)}
    merges = ["s e</w>", "v e", "ve n</w>", "t h", "th e</w>"]
    for m in merges:
        vocab["".join(m.split())] = len(vocab)
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    (root / "bpe" / "tokenizer").mkdir(parents=True)
    (root / "bpe" / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "bpe" / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])  # fmt: skip
    CLIPTextModel(cfg).save_pretrained(root / "bpe" / "model")


def _mutate_tokenizer(rng: random.Random, folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".json", ".txt"))
    path = rng.choice(files)
    op = rng.randrange(9)
    if op == 0:
        depth = rng.choice([2000, 100_000])
        path.write_text("[" * depth + "]" * depth)
        return f"{path.name}: {depth}-deep JSON"
    if op == 1:
        raw = bytearray(path.read_bytes())
        for _ in range(rng.randrange(1, 5)):
            raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, 0x80, 0xFE])
        path.write_bytes(bytes(raw))
        return f"{path.name}: non-UTF-8 bytes"
    if op == 2:
        path.write_bytes(path.read_bytes() + b" " * rng.choice([10, 60]) * 2**20)
        return f"{path.name}: huge (padded)"
    if op == 3 and path.name == "merges.txt":
        path.write_text(path.read_text() + rng.choice(["zz qq\n", "a b c\n", "\x00 x\n", "only\n"]))
        return "merges.txt: a merge of unknown tokens / odd arity"
    if op == 4 and path.name == "vocab.json":
        vocab = json.loads(path.read_text())
        vocab[rng.choice(list(vocab))] = rng.choice([10**6, -1, 2**40, "7", None, 1.5])
        path.write_text(json.dumps(vocab))
        return "vocab.json: an id beyond the embedding or of a wrong type"
    if op == 5 and path.name == "tokenizer.json":
        data = json.loads(path.read_text())
        model = data.get("model", {})
        if isinstance(model.get("vocab"), dict) and model["vocab"]:
            model["vocab"][rng.choice(list(model["vocab"]))] = rng.choice([10**6, -1, 2**40])
        elif isinstance(model.get("vocab"), list) and model["vocab"]:
            model["vocab"].append(["zz", 0.0])
        data["added_tokens"] = data.get("added_tokens", []) + [{"id": rng.choice([10**6, -5]), "content": "<zz>",
                                "special": True, "single_word": False, "lstrip": False, "rstrip": False,
                                "normalized": False}]  # fmt: skip
        path.write_text(json.dumps(data))
        return "tokenizer.json: ids beyond the embedding"
    if op == 6:
        path.write_text(rng.choice(["", "null", "[]", "1", '"x"', "{}", '{"model": 5}']))
        return f"{path.name}: junk JSON / text"
    if op == 7 and path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data:
            k = rng.choice(sorted(data))
            data[k] = rng.choice([None, 5, "x", [], {}, True, -1, 10**12])
            path.write_text(json.dumps(data))
            return f"{path.name}: {k} of a wrong type"
    return "unmutated"


_PROMPTS = [
    lambda r: "x " * r.choice([100, 10_000, 400_000]),
    lambda r: "a \ud800 seven",
    lambda r: "a \x1b[31m seven \x00\x07\r",
    lambda r: b"\xff\xfe a seven",
    lambda r: r.choice([None, 7, 3.5, ["a", 1], ("a", "b"), {"a": 1}, []]),
    lambda r: ["a seven", "\udcff"],
    lambda r: "".join(chr(r.randrange(1, 0x10FFFF)) for _ in range(200)).encode("utf-8", "replace").decode(),
    lambda r: "seven",
    lambda r: "",
]


def run_case(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    import torch
    from fuzz_common import judge_exception

    import fastflow
    from fastflow.loading import load_clip

    surface, index = case
    rng = random.Random(f"{seed}/{surface}/{index}")
    result = {"case": index, "surface": surface}
    try:
        if rng.random() < 0.55:
            kind = rng.choice(["json", "bpe"])
            shutil.copytree(seeds_root / kind, work)
            result["desc"] = f"{kind} tokenizer, " + _mutate_tokenizer(rng, work / "tokenizer")
            encoder = load_clip(work / "model", work / "tokenizer")
            out = encoder(["a seven the", "seven"])
        else:
            prompt = rng.choice(_PROMPTS)(rng)
            result["desc"] = f"prompt {prompt!r}"[:160]
            if "pipe" not in _STATE:
                _STATE["pipe"] = fastflow.load("fastflow-tiny-digits", device="cpu", dtype=torch.float32)
                _STATE["pipe"].set_progress_bar_config(disable=True)
            out = _STATE["pipe"](prompt, num_inference_steps=1, output_type="pt", seed=0).images
    except Exception as e:  # noqa: BLE001 - the point of the fuzzer
        result.update(judge_exception(e))
        if result["outcome"] == "typed" and result["desc"].endswith("unmutated"):
            result["outcome"] = "refused_valid"
        return result
    except BaseException as e:  # noqa: BLE001 - a pyo3 PanicException derives from BaseException
        result.update(outcome="untyped", error=f"{type(e).__name__}: {e}"[:300])
        return result
    tensors = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
    finite = all(bool(torch.isfinite(t.float()).all()) for t in tensors)
    result.update(outcome="ok" if finite else "nonfinite")
    return result
