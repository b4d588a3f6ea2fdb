"""Prompts to text embeddings: prompt lists checked, the text encoders' output through a small
cache (the negative "" of every CFG call and seed sweeps encode once)."""

from __future__ import annotations

import warnings

from ..errors import InputError, MissingComponentError
from .offload import text_models


def as_prompt_list(prompt, what: str = "prompt") -> list[str]:
    if prompt is None:
        raise InputError(f"pass a {what} (or precomputed embeddings)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    if any(not p.strip() for p in prompts) and what == "prompt":
        warnings.warn("empty prompt: the image will be unconditioned on text", UserWarning, stacklevel=3)
    return prompts


def check_negatives(negatives: int, prompts: int) -> None:
    """One negative prompt (or embedding) per prompt."""
    if negatives != prompts:
        raise InputError(
            f"{negatives} negative prompts for {prompts} prompts: pass one negative prompt (a string) or one per prompt"
        )


class PromptMixin:
    """A pipeline's text encoding (``self.text_encoder``, in the "text" stage), with the prompt
    cache that ``BasePipeline.__init__`` creates."""

    PROMPT_CACHE = 4  # prompt lists whose embeddings are kept (the negative "" of every CFG call, seed sweeps)

    def encode_text(self, prompts: list[str]):
        """The text encoder's output for ``prompts``, reusing the last few prompt lists' results.
        The cache key holds the prompts and every text-encoder parameter's identity, version,
        dtype and device, plus the encoders' lengths, so changed or moved weights never hit."""
        te = self.text_encoder
        models = text_models(te).values()
        state = tuple((id(p), p._version, p.dtype, p.device) for m in models for p in m.parameters())
        key = (tuple(prompts), getattr(te, "max_length", None), getattr(te, "t5_max_length", None), state)
        with self._prompt_lock:
            hit = self._prompt_cache.get(key)
            if hit is not None:
                self._prompt_cache.move_to_end(key)
                return hit
        with self.stage("text"):
            out = te(list(prompts))
        with self._prompt_lock:
            self._prompt_cache[key] = out
            while len(self._prompt_cache) > self.PROMPT_CACHE:
                self._prompt_cache.popitem(last=False)
        return out

    def pooled_embeds(self, prompt, embeds, pooled, what: str):
        """(sequence, pooled) embeddings of SD3 / SDXL: the given pair, or the text encoder's for
        ``prompt`` (through the prompt cache)."""
        if embeds is not None:
            if pooled is None:
                raise InputError(f"{what}_embeds needs pooled {what} embeddings too")
            return embeds, pooled
        if self.text_encoder is None:
            raise MissingComponentError(
                "this pipeline has no text encoders: pass prompt embeddings, or load the model with its text encoders"
            )
        return self.encode_text(as_prompt_list(prompt, what))
