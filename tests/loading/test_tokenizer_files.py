"""Tokenizer folders and prompts: every broken file or prompt is a typed fastflow error (issue 31)."""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import torch

from fastflow import errors
from fastflow.loading.components import load_clip
from fastflow.loading.source import DEFAULT_MODEL
from fastflow.loading.tokenizer import load_tokenizer
from fastflow.models.prompt_tokens import tokenize_prompts
from fastflow.models.text import CLIPEncoder

TOK = DEFAULT_MODEL / "tokenizer"


@pytest.fixture
def clip_folder(tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(DEFAULT_MODEL / "text_encoder", folder)
    for f in TOK.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _tok_json(folder):
    return json.loads((folder / "tokenizer.json").read_text())


def _bpe_folder(tmp_path, merges: bytes, vocab=None):
    folder = tmp_path / "bpe"
    folder.mkdir(parents=True)
    vocab = vocab or {"<|startoftext|>": 0, "<|endoftext|>": 1, "a": 2, "b": 3, "ab": 4, "a</w>": 5, "b</w>": 6}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_bytes(merges)
    return folder


def test_deep_tokenizer_json_is_typed(clip_folder):
    (clip_folder / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(errors.HeaderError, match="deeper"):  # RecursionError before
        load_tokenizer(clip_folder, "CLIP text encoder", "clip")


def test_tokenizer_json_of_wrong_types_is_typed(clip_folder):
    for bad in ([], {"model": []}, {"model": {"type": "WordLevel", "vocab": {"a": "x"}}}, {"added_tokens": 3}):
        (clip_folder / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(errors.CheckpointError, match="tokenizer.json"):
            load_tokenizer(clip_folder, "CLIP text encoder", "clip")


def test_non_utf8_merges_are_typed(tmp_path):
    folder = _bpe_folder(tmp_path, b"#version: 0.2\na b\n\xff\xfe c\n")
    with pytest.raises(errors.HeaderError, match="merges.txt.*UTF-8"):  # UnicodeDecodeError before
        load_tokenizer(folder, "CLIP text encoder", "clip")


def test_merges_naming_unknown_tokens_are_typed(tmp_path):
    folder = _bpe_folder(tmp_path, b"#version: 0.2\na zz\n")
    with pytest.raises(errors.CheckpointError, match="merges.txt.*'zz'"):  # bare Exception before
        load_tokenizer(folder, "CLIP text encoder", "clip")
    good = _bpe_folder(tmp_path / "ok", b"#version: 0.2\na b\n")
    assert load_tokenizer(good, "CLIP text encoder", "clip")(["ab"], 4).shape == (1, 4)


def test_non_utf8_vocab_json_is_typed(tmp_path):
    folder = _bpe_folder(tmp_path, b"a b\n")
    (folder / "vocab.json").write_bytes(b'{"\xff": 1}')
    with pytest.raises(errors.HeaderError):
        load_tokenizer(folder, "CLIP text encoder", "clip")


def test_panic_in_tokenizers_becomes_typed(clip_folder, monkeypatch):
    """pyo3's PanicException derives from BaseException: it escaped every `except Exception`."""
    import tokenizers

    class PanicException(BaseException):
        pass

    def panic(*a, **k):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", panic, raising=False)
    monkeypatch.setattr(tokenizers.Tokenizer, "from_file", panic, raising=False)
    with pytest.raises(errors.CheckpointError, match="panicked"):
        load_tokenizer(clip_folder, "CLIP text encoder", "clip")


def test_panic_while_tokenizing_becomes_typed(clip_folder):
    tok = load_tokenizer(clip_folder, "CLIP text encoder", "clip")

    class PanicException(BaseException):
        pass

    class Backend:
        def __getattr__(self, name):
            def panic(*a, **k):
                raise PanicException("boom")

            return panic

    tok._backend = Backend()
    with pytest.raises(errors.CheckpointError, match=str(clip_folder)):
        tok(["a"], 8)


def test_token_ids_beyond_the_embedding_are_refused_at_load(clip_folder):
    data = _tok_json(clip_folder)
    vocab = data["model"]["vocab"]
    word = next(w for w in vocab if w.isalpha())
    vocab[word] = 5000  # sparse id: the count still fits, the id does not (IndexError at the first prompt before)
    (clip_folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(errors.CheckpointError, match="5000"):
        load_clip(clip_folder)


def test_added_token_beyond_the_embedding_is_refused_at_load(clip_folder):
    data = _tok_json(clip_folder)
    extra = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    data["added_tokens"].append({"id": 900, "content": "<x>", **extra})
    (clip_folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(errors.CheckpointError, match="900"):
        load_clip(clip_folder)


def test_post_processor_id_beyond_the_embedding_is_refused_at_load(clip_folder):
    data = _tok_json(clip_folder)
    data["post_processor"]["special_tokens"]["<|endoftext|>"]["ids"] = [777]
    (clip_folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(errors.CheckpointError, match="777"):
        load_clip(clip_folder)


def test_template_naming_an_undefined_special_token_is_refused_at_load(clip_folder):
    """The tokenizers package panicked (a Rust backtrace on stderr) at the first prompt before."""
    data = _tok_json(clip_folder)
    data["post_processor"]["special_tokens"] = {}
    (clip_folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(errors.CheckpointError, match="does not define"):
        load_tokenizer(clip_folder, "CLIP text encoder", "clip")


def test_encoder_refuses_a_tokenizer_bigger_than_its_embedding(clip_folder):
    """Every path (also an encoder built by hand) checks the ids against the embedding."""
    enc = load_clip(clip_folder)
    small = torch.nn.Embedding(3, enc.model.embeddings.token_embedding.embedding_dim)
    enc.model.embeddings.token_embedding = small
    with pytest.raises(errors.CheckpointError, match="embedding"):
        CLIPEncoder(enc.model, enc.tokenizer)


# -- prompts -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tok():
    return load_tokenizer(TOK, "CLIP text encoder", "clip")


@pytest.mark.parametrize("prompt", [b"a photo", "a \ud800 photo", ["ok", b"\xff"]])
def test_invalid_utf8_prompt_is_input_error(clip_tok, prompt):
    with pytest.raises(errors.InputError, match="UTF-8|string"):  # TypeError before
        tokenize_prompts(clip_tok, prompt, 8, "CLIP text encoder")


def test_as_prompt_list_refuses_lone_surrogates():
    from fastflow.pipelines.prompts import as_prompt_list

    with pytest.raises(errors.InputError, match="UTF-8"):
        as_prompt_list("a \udcff b")


def test_huge_prompt_is_fast_and_gives_the_same_ids(clip_tok):
    from fastflow.models.prompt_tokens import prompt_cut

    words = [w for w in _tok_json(TOK)["model"]["vocab"] if w.isalpha()]
    rng = random.Random(0)
    long = " ".join(rng.choice(words) for _ in range(40_000))  # ~240 KB: under the cap
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated"):
        ids = tokenize_prompts(clip_tok, [long], 77, "CLIP text encoder")
    assert time.perf_counter() - start < 2.0
    cut = prompt_cut(77)
    kept = [i for i, c in enumerate(long[: 3 * cut]) if not c.isspace()]  # the cut counts non-whitespace
    for n in (kept[cut - 2] + 1, kept[cut - 1] + 1, kept[cut] + 1, kept[cut + 50] + 1):
        text = long[:n]
        assert torch.equal(tokenize_prompts(clip_tok, [text], 77, "x"), clip_tok([text], 77))
    assert torch.equal(ids, clip_tok([long[: 4 * cut]], 77))


def test_prompt_of_whitespace_then_words_keeps_the_words(clip_tok):
    """Whitespace yields no token: a cut by characters alone would lose the words after it."""
    prompt = " " * 100_000 + "a photo of a cat"
    assert torch.equal(tokenize_prompts(clip_tok, [prompt], 77, "x"), clip_tok([prompt], 77))


def test_prompt_beyond_the_hard_cap_is_input_error(clip_tok):
    from fastflow.models.prompt_tokens import MAX_PROMPT_BYTES

    with pytest.raises(errors.InputError, match="bytes"):
        tokenize_prompts(clip_tok, ["a" * (MAX_PROMPT_BYTES + 1)], 77, "CLIP text encoder")
    start = time.perf_counter()
    with pytest.raises(errors.InputError, match="10000000 bytes"):  # 48 s and 1.5 GB before
        tokenize_prompts(clip_tok, ["a photo " * 1_250_000], 77, "CLIP text encoder")
    assert time.perf_counter() - start < 0.5
    assert tokenize_prompts(clip_tok, ["a " * (MAX_PROMPT_BYTES // 2)], 77, "x").shape == (
        1,
        77,
    )  # at the cap: accepted


# -- fuzz ----------------------------------------------------------------------------------------
def _mutations(data: dict, rng: random.Random):
    raw = json.dumps(data)
    yield raw[: rng.randrange(len(raw))]  # truncated
    yield raw.replace('"id": 1', '"id": -1')
    yield raw.replace('"vocab"', '"vocab": 1, "x"')
    yield json.dumps({**data, "model": {**data["model"], "vocab": list(data["model"]["vocab"])}})
    yield json.dumps({**data, "model": {**data["model"], "type": "BPE", "merges": [["zz", "q"]]}})
    yield json.dumps({**data, "added_tokens": [{"id": "x"}]})
    yield json.dumps({**data, "model": {**data["model"], "unk_token": 5}})
    yield json.dumps({**data, "normalizer": {"type": "Nope"}})
    yield json.dumps({**data, "post_processor": {"type": "TemplateProcessing", "single": 1}})
    yield "{" * 5000
    yield '{"a": 1e400}'
    for _ in range(40):  # random byte flips, and random values at random places of the structure
        b = bytearray(raw.encode())
        for _ in range(rng.randrange(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        yield bytes(b)
        yield _replace_random(data, rng)


def _replace_random(data, rng: random.Random) -> str:
    data = json.loads(json.dumps(data))
    node = data
    for _ in range(rng.randrange(1, 4)):
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            break
        key = rng.choice(keys)
        if rng.random() < 0.5 or not isinstance(node[key], (dict, list)):
            node[key] = rng.choice([None, -1, 2**70, 1.5, "x", [], {}, "\ud800", True, 10**6])
            break
        node = node[key]
    return json.dumps(data)


def test_fuzz_broken_tokenizer_folders_and_prompts_are_typed(tmp_path):
    rng = random.Random(31)
    base = _tok_json(TOK)
    cases = 0
    for i, text in enumerate(_mutations(base, rng)):
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        shutil.copy(TOK / "tokenizer_config.json", folder)
        (folder / "tokenizer.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        try:
            tok = load_tokenizer(folder, "CLIP text encoder", "clip")
            tokenize_prompts(tok, ["a photo", ""], 8, "x")
        except errors.FastflowError:
            pass
        cases += 1
    for merges in (b"\x80\x81", b"a b c\n", b"a\n", b"<|endoftext|> a\n", b"\xef\xbb\xbfa b\n", b"a b\n" * 3):
        folder = _bpe_folder(tmp_path / f"m{cases}", merges)
        try:
            load_tokenizer(folder, "CLIP text encoder", "clip")(["ab a"], 8)
        except errors.FastflowError:
            pass
        cases += 1
    tok = load_tokenizer(TOK, "CLIP text encoder", "clip")
    for prompt in ("\x00", "\ud83d", "\U0010ffff" * 1000, "x" * 10_000, 3, None, [""], [b"a"], "\u200b" * 10):
        try:
            tokenize_prompts(tok, prompt, 8, "x")
        except errors.FastflowError:
            pass
        cases += 1
    assert cases > 100
