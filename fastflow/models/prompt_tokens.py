"""Prompts before the tokenizer: checked (a string of valid UTF-8, at most MAX_PROMPT_BYTES), cut
where the cut cannot change the tokens the model sees, and the tokenizer's ids checked against the
text encoder's embedding."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import CheckpointError, InputError

# A prompt is refused beyond this many UTF-8 bytes: no text encoder sees more than 512 tokens (a few
# KB of text), and the tokenizers package takes ~5 s per MB and ~150 bytes of memory per byte.
MAX_PROMPT_BYTES = 256 * 1024
# The cut before the tokenizer keeps max_length x this many non-whitespace characters: a real CLIP
# or T5 token covers at most ~20 characters, so the kept text holds several times the tokens the
# model sees. The cut is exact whatever the tokens' length: it ends at a whitespace (the words before
# it tokenize as in the whole prompt: CLIP's and T5's pre-tokenizers split words at whitespace), and
# it is used only when it alone yields more than max_length tokens, so the first max_length tokens,
# all the model sees, are those of the whole prompt. Otherwise the whole prompt is tokenized.
CHARS_PER_TOKEN = 64


def prompt_cut(max_length: int) -> int:
    """Non-whitespace characters kept before the tokenizer for a model that sees max_length tokens."""
    return max_length * CHARS_PER_TOKEN


def utf8_size(prompt: str, what: str = "a prompt") -> int:
    """The prompt's size in UTF-8 bytes; an InputError where it is not valid UTF-8 text (a lone surrogate)."""
    try:
        return len(prompt.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise InputError(
            f"{what} is not valid UTF-8 text ({e.reason} at character {e.start}): remove the lone surrogate"
        ) from None


def _check_prompt(prompt, what: str) -> str:
    if not isinstance(prompt, str):
        raise InputError(f"a prompt for the {what} must be a string, got {type(prompt).__name__}: decode bytes first")
    size = len(prompt)
    if size <= MAX_PROMPT_BYTES:  # every character is at least a byte: a longer one is over the limit anyway
        size = utf8_size(prompt)
    if size > MAX_PROMPT_BYTES:
        raise InputError(
            f"a prompt of {size} bytes is over the limit of {MAX_PROMPT_BYTES} bytes (the {what} sees only the "
            "first tokens): shorten it"
        )
    return prompt


def _cut(prompt: str, max_length: int) -> str:
    """The prompt up to the last whitespace before its prompt_cut(max_length)-th non-whitespace
    character, or the prompt itself when it is shorter or has no whitespace there."""
    keep = prompt_cut(max_length)
    if len(prompt) <= keep:
        return prompt
    seen, i = 0, -1
    while seen < keep:
        i += 1
        if i == len(prompt):
            return prompt
        seen += not prompt[i].isspace()
    while i > 0 and not prompt[i].isspace():
        i -= 1
    return prompt[:i] if i > 0 else prompt


def check_vocabulary(tokenizer, embedding: nn.Embedding, what: str) -> None:
    """Every id the tokenizer can emit indexes the embedding (else an IndexError at the first prompt)."""
    top = max(len(tokenizer) - 1, getattr(tokenizer, "max_id", -1))
    if top >= embedding.num_embeddings:
        raise CheckpointError(
            getattr(tokenizer, "folder", None),
            f"the {what} tokenizer emits token ids up to {top} but the model's embedding holds "
            f"{embedding.num_embeddings}",
            "use the tokenizer that belongs to this text encoder",
        )


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts for the {what} must be a string or a list of strings, got {type(prompts).__name__}")
    prompts = [_check_prompt(p, what) for p in prompts]
    cut = [_cut(p, max_length) for p in prompts]
    lengths = tokenizer.lengths(cut)
    whole = [i for i, (c, p, n) in enumerate(zip(cut, prompts, lengths, strict=True)) if c is not p and n <= max_length]
    if whole:  # a cut that yields too few tokens is not used (see CHARS_PER_TOKEN)
        for i, n in zip(whole, tokenizer.lengths([prompts[i] for i in whole]), strict=True):
            cut[i], lengths[i] = prompts[i], n
    ids = tokenizer(cut, max_length)
    if max(lengths, default=0) > max_length:
        warnings.warn(
            f"a prompt is longer than the {what}'s {max_length} tokens and was truncated", UserWarning, stacklevel=3
        )
    return ids
