"""Tokenizers for the text encoders, read with the ``tokenizers`` package (no transformers).

A folder's ``tokenizer.json`` is read as is. A CLIP folder with only the BPE files
(``vocab.json`` + ``merges.txt``, as FLUX's and SD3's ``tokenizer/`` ship) is assembled from them
with CLIP's normalizer (NFC, whitespace runs to one space, lower case), its pre-tokenizer split
and byte-level BPE with the ``</w>`` word suffix, and ``<|startoftext|> ... <|endoftext|>``
around every prompt. Any other folder (a T5 ``spiece.model`` alone) is read by transformers when
it is installed, else refused naming the file to add. Special tokens and ``model_max_length``
come from ``tokenizer_config.json`` / ``special_tokens_map.json``.

Encoding matches transformers' ``tokenizer(prompts, padding="max_length", max_length=N,
truncation=True)``: special tokens added, the text truncated so that they fit, then padded on the
right with the pad token.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, HeaderError, TooLargeError
from .files import open_regular, parse_json, read_limited
from .source import inside

MAX_TOKENIZER_FILE = 64 * 1024 * 1024
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model")
# CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits and
# runs of other non-space characters
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def check_tokenizer_folder(folder: Path, what: str) -> None:
    """Every tokenizer file the tokenizer may read stays inside the folder, is a regular file and
    of bounded size."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(folder, f"{what} tokenizer folder not found", "pass the local tokenizer folder")
    names = {p.name for p in folder.iterdir()}
    if not names & {"tokenizer_config.json", "tokenizer.json", "vocab.json"}:
        raise CheckpointError(
            folder,
            f"no tokenizer files for the {what}",
            "pass the local tokenizer folder (tokenizer.json / tokenizer_config.json)",
        )
    for path in sorted(folder.iterdir()):
        if path.suffix not in _TOKENIZER_SUFFIXES:
            continue
        inside(folder, path, f"'{path.name}'")
        fd, size = open_regular(path, f"{what} tokenizer file")
        os.close(fd)
        if size > MAX_TOKENIZER_FILE:
            raise TooLargeError(path, f"tokenizer file is {size} bytes (limit {MAX_TOKENIZER_FILE})", "check the file")


def _read_json(path: Path, what: str) -> dict:
    """A tokenizer JSON file as an object: bounded size and depth, UTF-8, every failure typed."""
    if not path.is_file():
        return {}
    value = _parse(path, what)
    if not isinstance(value, dict):
        raise CheckpointError(path, f"the {what} tokenizer file is not a JSON object", "re-download it")
    return value


def _parse(path: Path, what: str):
    return parse_json(read_limited(path, f"{what} {path.name}", MAX_TOKENIZER_FILE), path, f"the {what} {path.name}")


def _read_text(path: Path, what: str) -> str:
    try:
        return read_limited(path, f"{what} {path.name}", MAX_TOKENIZER_FILE).decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(path, f"the {what} {path.name} is not UTF-8 text ({e})", "re-download it") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bad(path: Path, what: str, problem: str) -> CheckpointError:
    return CheckpointError(path, f"the {what} {path.name} {problem}", "re-download it")


def _check_vocab(vocab, path: Path, what: str) -> None:
    """vocab.json / a BPE, WordLevel or WordPiece vocabulary: token -> id >= 0."""
    if not isinstance(vocab, dict) or not all(_is_int(i) and i >= 0 for i in vocab.values()):
        raise _bad(path, what, "vocabulary is not a map of tokens to non-negative integer ids")


def _tokenizer_json_ids(data, path: Path, what: str) -> list[int]:
    """Checks the types of tokenizer.json's parts before the tokenizers package reads it (its errors
    are bare Exceptions or Rust panics) and returns every id it can emit: the vocabulary's, the
    added tokens' and the ids its post-processor inserts."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise _bad(path, what, "is not a tokenizer (no 'model' object)")
    model, ids = data["model"], []
    vocab = model.get("vocab")
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]; the id is the position
        if not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) for v in vocab):
            raise _bad(path, what, "Unigram vocabulary is not a list of [piece, score]")
        ids.append(len(vocab) - 1)
    elif vocab is not None:
        _check_vocab(vocab, path, what)
        ids.extend(vocab.values())
    merges = model.get("merges")
    if merges is not None and not isinstance(merges, list):
        raise _bad(path, what, "merges are not a list")
    added = data.get("added_tokens", [])
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and _is_int(t.get("id")) and t["id"] >= 0 and isinstance(t.get("content"), str)
        for t in added
    ):
        raise _bad(path, what, "added_tokens are not a list of {id: integer >= 0, content: string}")
    ids.extend(t["id"] for t in added)
    stack = [data.get("post_processor")]
    while stack:  # TemplateProcessing special_tokens.*.ids, Roberta / Bert cls and sep, Sequence
        part = stack.pop()
        if isinstance(part, dict) and part.get("type") == "TemplateProcessing":
            _check_template(part, path, what)
        if isinstance(part, dict):
            for key, value in part.items():
                if key == "ids" and isinstance(value, list):
                    ids.extend(v for v in value if _is_int(v))
                elif key in ("cls", "sep") and isinstance(value, list) and len(value) == 2 and _is_int(value[1]):
                    ids.append(value[1])
                else:
                    stack.append(value)
        elif isinstance(part, list):
            stack.extend(part)
    if any(i < 0 for i in ids):
        raise _bad(path, what, "names a negative token id")
    return ids


def _check_template(part: dict, path: Path, what: str) -> None:
    """A TemplateProcessing post-processor's special tokens are defined (the tokenizers package
    panics at the first prompt on a template naming an undefined one)."""
    specials = part.get("special_tokens", {})
    if not isinstance(specials, dict) or not all(
        isinstance(v, dict)
        and isinstance(v.get("ids"), list)
        and isinstance(v.get("tokens"), list)
        and len(v["ids"]) == len(v["tokens"])
        and all(_is_int(i) for i in v["ids"])
        for v in specials.values()
    ):
        raise _bad(path, what, "post-processor's special_tokens are not {name: {ids: [int], tokens: [str]}}")
    for side in ("single", "pair"):
        items = part.get(side, [])
        if not isinstance(items, list):
            raise _bad(path, what, f"post-processor's {side} template is not a list")
        for item in items:
            special = item.get("SpecialToken") if isinstance(item, dict) else None
            if isinstance(special, dict) and special.get("id") not in specials:
                raise _bad(
                    path, what, f"post-processor names special token {str(special.get('id'))[:80]!r} it does not define"
                )


def library_call(folder: Path, what: str, call, *args):
    """Runs a call into the tokenizers package; its failures become typed errors naming the folder.

    A Rust panic arrives as pyo3_runtime.PanicException, which derives from BaseException (not
    Exception), so it is caught here by name; KeyboardInterrupt / SystemExit pass through."""
    try:
        return call(*args)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers package raises bare Exception on bad files
        raise CheckpointError(
            folder, f"the {what} tokenizer cannot be used ({type(e).__name__}: {e})", "re-download the tokenizer files"
        ) from None
    except BaseException as e:  # noqa: BLE001 - pyo3 PanicException
        if type(e).__name__ != "PanicException":
            raise
        raise CheckpointError(
            folder, f"the tokenizers package panicked on the {what} tokenizer ({e})", "re-download the tokenizer files"
        ) from None


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """prompts -> token ids [B, N] (transformers' padding="max_length", truncation=True)."""

    def __init__(self, backend, pad_token, model_max_length: int | None, folder: Path, what: str, extra_ids=()):
        self.folder, self.what = folder, what
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_id = library_call(folder, what, backend.token_to_id, pad_token)
        if self.pad_id is None:
            raise CheckpointError(
                folder, f"the {what} tokenizer's pad token {pad_token!r} is not in its vocabulary", "re-download it"
            )
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        vocab = library_call(folder, what, backend.get_vocab, True)
        self.max_id = max([*vocab.values(), *extra_ids, self.pad_id], default=0)
        # padding / truncation are settings of the backend object: one call at a time sets them
        # (concurrent generations share the tokenizer)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return library_call(self.folder, self.what, self._backend.get_vocab_size, True)

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts with special tokens, before truncation."""
        with self._lock:
            return [len(e.ids) for e in library_call(self.folder, self.what, self._backend.encode_batch, prompts)]

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        def encode():
            self._backend.enable_truncation(max_length)
            self._backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
            try:
                return [e.ids for e in self._backend.encode_batch(prompts)]
            finally:
                self._backend.no_padding()
                self._backend.no_truncation()

        with self._lock:
            ids = library_call(self.folder, self.what, encode)
        return torch.tensor(ids, dtype=torch.long)


class TransformersTokenizer:
    """The same interface over a transformers tokenizer (folders with only slow-tokenizer files)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.model_max_length = tokenizer.model_max_length
        self.pad_id = tokenizer.pad_token_id
        self.max_id = max([*tokenizer.get_vocab().values(), self.pad_id or 0], default=0)

    def __len__(self) -> int:
        return len(self._tok)

    def lengths(self, prompts: list[str]) -> list[int]:
        return [len(ids) for ids in self._tok(prompts, truncation=False).input_ids]

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        out = self._tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return out.input_ids


def _clip_bpe(folder: Path, specials: dict, what: str):
    """CLIP's byte-level BPE from vocab.json + merges.txt (the pipeline transformers' CLIPTokenizer builds)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = _read_json(folder / "vocab.json", what)
    _check_vocab(vocab, folder / "vocab.json", what)
    merges = []
    for n, line in enumerate(_read_text(folder / "merges.txt", what).splitlines(), 1):
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise CheckpointError(folder / "merges.txt", f"line {line[:80]!r} is not a merge pair", "re-download it")
        unknown = [t for t in (*pair, pair[0] + pair[1]) if t not in vocab]
        if unknown:  # the tokenizers package raises a bare Exception on these
            raise CheckpointError(
                folder / "merges.txt",
                f"line {n} merges {pair[0][:40]!r} and {pair[1][:40]!r} but {unknown[0][:80]!r} is not in vocab.json",
                "use the vocab.json and merges.txt of the same tokenizer",
            )
        merges.append(tuple(pair))
    bos, eos, unk = (specials[k] for k in ("bos_token", "eos_token", "unk_token"))
    missing = [t for t in (bos, eos, unk) if t not in vocab]
    if missing:
        raise CheckpointError(
            folder / "vocab.json", f"special tokens {missing} are not in vocab.json", "re-download it"
        )
    bpe = library_call(
        folder,
        what,
        lambda: BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk),
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        (eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False, add_prefix_space=False
    )
    return tok


def _transformers_tokenizer(folder: Path, what: str) -> TransformersTokenizer:
    present = sorted(p.name for p in folder.iterdir())
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer folder has no tokenizer.json (found: {', '.join(present) or 'nothing'})",
            "add the model's tokenizer.json to the folder, or `pip install transformers` to read the slow-tokenizer "
            "files",
        ) from None
    warnings.warn(f"{folder}: no tokenizer.json, reading the tokenizer with transformers", UserWarning, stacklevel=4)
    # transformers / tokenizers fail in many ways (even bare Exception, or a Rust panic)
    tok = library_call(folder, what, lambda: AutoTokenizer.from_pretrained(folder, local_files_only=True))
    return library_call(folder, what, TransformersTokenizer, tok)


def load_tokenizer(folder, what: str, style: str):
    """The tokenizer in ``folder``; ``style`` ("clip" or "t5") picks the defaults transformers' class
    for that model would use (pad token, special tokens) when the config does not name them."""
    folder = Path(folder).expanduser()
    check_tokenizer_folder(folder, what)
    config = {
        **_read_json(folder / "special_tokens_map.json", what),
        **_read_json(folder / "tokenizer_config.json", what),
    }
    defaults = {**CLIP_SPECIALS, "pad_token": "<|endoftext|>"} if style == "clip" else {"pad_token": "<pad>"}
    specials = {k: _token(config.get(k)) or v for k, v in defaults.items()}
    length = config.get("model_max_length")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
        raise CheckpointError(
            folder,
            f"the {what} tokenizer's model_max_length is {length!r}, not a positive integer",
            "fix tokenizer_config.json",
        )
    from tokenizers import Tokenizer as Backend

    extra_ids = ()
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        data = _parse(path, what)  # bounded size and depth before the tokenizers package parses it
        extra_ids = _tokenizer_json_ids(data, path, what)
        backend = library_call(path, what, Backend.from_str, json.dumps(data))
    elif style == "clip" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _clip_bpe(folder, specials, what)
    else:
        return _transformers_tokenizer(folder, what)
    return Tokenizer(backend, specials["pad_token"], length, folder, what, extra_ids)


def check_tokenizer_fits(positions: int | None, what: str, folder: Path, max_length=None):
    """CLIP's positions must cover the prompt length. (That every id the tokenizer can emit indexes
    the embedding, the encoders check themselves: models.prompt_tokens.check_vocabulary.)"""
    if positions is not None and max_length is not None and max_length > positions:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer pads prompts to {max_length} tokens but the model has {positions} positions",
            "use the tokenizer that belongs to this text encoder",
        )
