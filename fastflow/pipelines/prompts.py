"""Prompts to text embeddings: prompt lists checked, the text encoders' output through a small
cache (the negative "" of every CFG call and seed sweeps encode once), and the one preparation of
prompts, negative prompts and given embeddings that every family runs (:meth:`PromptMixin.prepare_text`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import InputError, MissingComponentError
from ..models.prompt_tokens import utf8_size
from .offload import text_models


def as_prompt_list(prompt, what: str = "prompt") -> list[str]:
    if prompt is None:
        raise InputError(f"pass a {what} (or precomputed embeddings)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    for p in prompts:
        utf8_size(p, what)
    if any(not p.strip() for p in prompts) and what == "prompt":
        warnings.warn("empty prompt: the image will be unconditioned on text", UserWarning, stacklevel=3)
    return prompts


def check_negatives(negatives: int, prompts: int) -> None:
    """One negative prompt (or embedding) per prompt."""
    if negatives != prompts:
        raise InputError(
            f"{negatives} negative prompts for {prompts} prompts: pass one negative prompt (a string) or one per prompt"
        )


@dataclass
class Text:
    """One call's text conditioning, repeated per image and on the device: the prompts' (sequence,
    pooled) embeddings and, with CFG, the negatives'."""

    cond: tuple[torch.Tensor, torch.Tensor]
    uncond: tuple[torch.Tensor, torch.Tensor] | None = None
    uncond_first: bool = True  # the CFG batch's order: [uncond ; cond] (SD3, SDXL) or [cond ; uncond] (FLUX)

    @property
    def images(self) -> int:
        return self.cond[0].shape[0]

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What one forward gets: the prompts' embeddings, or with CFG both halves in the family's order."""
        if self.uncond is None:
            return self.cond
        first, second = (self.uncond, self.cond) if self.uncond_first else (self.cond, self.uncond)
        return torch.cat((first[0], second[0])), torch.cat((first[1], second[1]))


def check_embeds(embeds: torch.Tensor, pooled: torch.Tensor, what: str) -> None:
    """Given embeddings: floating [B, L, D] sequence and [B, P] pooled ones of one batch size B."""
    pooled_name = "pooled_prompt_embeds" if what == "prompt" else "negative_pooled_prompt_embeds"
    for name, t, ndim in ((f"{what}_embeds", embeds, 3), (pooled_name, pooled, 2)):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim or not t.is_floating_point() or 0 in t.shape:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{name} must be a non-empty floating tensor with {ndim} dims, got {shape}")
    if embeds.shape[0] != pooled.shape[0]:
        raise InputError(f"{what}_embeds has batch size {embeds.shape[0]} but {pooled_name} has "
                         f"{pooled.shape[0]}: pass one pooled embedding per prompt")  # fmt: skip


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
        """(sequence, pooled) embeddings: the given pair, or the text encoder's for ``prompt``
        (through the prompt cache). ``what``: "prompt" or "negative_prompt"."""
        if embeds is not None:
            if pooled is None:
                raise InputError(f"{what}_embeds needs pooled {what} embeddings too")
            check_embeds(embeds, pooled, what)
            return embeds, pooled
        if self.text_encoder is None:
            raise MissingComponentError(
                "this pipeline has no text encoders: pass prompt embeddings, or load the model with its text encoders"
            )
        return self.encode_text(as_prompt_list(prompt, what))

    def prepare_text(self, r, cfg: bool, zeros_for_empty_negative: bool = False, uncond_first: bool = True) -> Text:
        """The text conditioning of request ``r``: ``prompt`` (or ``prompt_embeds`` and
        ``pooled_prompt_embeds``) per image (``num_images_per_prompt``); with ``cfg`` also the
        negatives: ``negative_prompt`` (a string serves every prompt) or the negative embeddings,
        and without either "" encoded (as the references do) or, with ``zeros_for_empty_negative``,
        zeros (diffusers' SDXL ``force_zeros_for_empty_prompt``). Prompts are encoded before
        negatives. The CFG batch is [uncond ; cond] (diffusers' SD3 / SDXL) or, with
        ``uncond_first=False``, [cond ; uncond] (FLUX's true CFG)."""
        k = r.num_images_per_prompt

        def per_image(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(k, 0).to(self.device)

        embeds, pooled = self.pooled_embeds(r.prompt, r.prompt_embeds, r.pooled_prompt_embeds, "prompt")
        prompts = embeds.shape[0]
        self.images_per_call(prompts, k)
        cond = per_image(embeds), per_image(pooled)
        if not cfg:
            return Text(cond)
        negative = r.negative_prompt
        if r.negative_prompt_embeds is None and negative is None and zeros_for_empty_negative:
            uncond = torch.zeros_like(cond[0]), torch.zeros_like(cond[1])
        else:
            if r.negative_prompt_embeds is None and (negative is None or isinstance(negative, str)):
                negative = [negative or ""] * prompts
            neg = self.pooled_embeds(
                negative, r.negative_prompt_embeds, r.negative_pooled_prompt_embeds, "negative_prompt"
            )
            check_negatives(neg[0].shape[0], prompts)
            uncond = per_image(neg[0]), per_image(neg[1])
        return Text(cond, uncond, uncond_first)
