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

from ..errors import CheckpointError, TooLargeError
from .files import open_regular
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
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, f"the {what} tokenizer file is not valid JSON ({e})", "re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"the {what} tokenizer file is not a JSON object", "re-download it")
    return value


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """prompts -> token ids [B, N] (transformers' padding="max_length", truncation=True)."""

    def __init__(self, backend, pad_token: str, model_max_length: int | None, folder: Path, what: str):
        self.folder, self.what = folder, what
        self.model_max_length = model_max_length
        self.pad_token = pad_token
        self.pad_id = backend.token_to_id(pad_token)
        if self.pad_id is None:
            raise CheckpointError(
                folder, f"the {what} tokenizer's pad token {pad_token!r} is not in its vocabulary", "re-download it"
            )
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        # padding / truncation are settings of the backend object: one call at a time sets them
        # (concurrent generations share the tokenizer)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts with special tokens, before truncation."""
        with self._lock:
            return [len(e.ids) for e in self._backend.encode_batch(prompts)]

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        with self._lock:
            self._backend.enable_truncation(max_length)
            self._backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad_token)
            try:
                ids = [e.ids for e in self._backend.encode_batch(prompts)]
            finally:
                self._backend.no_padding()
                self._backend.no_truncation()
        return torch.tensor(ids, dtype=torch.long)


class TransformersTokenizer:
    """The same interface over a transformers tokenizer (folders with only slow-tokenizer files)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.model_max_length = tokenizer.model_max_length
        self.pad_id = tokenizer.pad_token_id

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
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise CheckpointError(folder / "merges.txt", f"line {line!r} is not a merge pair", "re-download it")
        merges.append(tuple(pair))
    bos, eos, unk = (specials[k] for k in ("bos_token", "eos_token", "unk_token"))
    missing = [t for t in (bos, eos, unk) if t not in vocab]
    if missing:
        raise CheckpointError(
            folder / "vocab.json", f"special tokens {missing} are not in vocab.json", "re-download it"
        )
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=unk)
    )
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
    try:
        return TransformersTokenizer(AutoTokenizer.from_pretrained(folder, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - transformers / tokenizers fail in many ways (even bare Exception)
        raise CheckpointError(
            folder, f"the {what} tokenizer cannot be read ({type(e).__name__}: {e})", "re-download the tokenizer files"
        ) from None


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

    if (folder / "tokenizer.json").is_file():
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - the tokenizers package raises bare Exception on bad files
            raise CheckpointError(
                folder / "tokenizer.json", f"the {what} tokenizer cannot be read ({e})", "re-download tokenizer.json"
            ) from None
    elif style == "clip" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        backend = _clip_bpe(folder, specials, what)
    else:
        return _transformers_tokenizer(folder, what)
    return Tokenizer(backend, specials["pad_token"], length, folder, what)


def check_tokenizer_fits(tokenizer, vocab: int, positions: int | None, what: str, folder: Path, max_length=None):
    """Token ids must index the embedding table, and CLIP's positions must cover the prompt length."""
    if len(tokenizer) > vocab:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer has {len(tokenizer)} tokens but the model's embedding holds {vocab}",
            "use the tokenizer that belongs to this text encoder",
        )
    if positions is not None and max_length is not None and max_length > positions:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer pads prompts to {max_length} tokens but the model has {positions} positions",
            "use the tokenizer that belongs to this text encoder",
        )
