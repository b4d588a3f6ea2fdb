"""Text encoders: thin wrappers over transformers' CLIP and T5 encoders (built from local folders
by :mod:`fastflow.loading.components`).

What each family feeds its transformer (REFERENCE.md section 6):

* FLUX: ``y`` = CLIP-L ``pooler_output`` (final-LN EOS state, no projection) [B, 768];
  ``txt`` = T5 ``last_hidden_state`` padded to 512 (dev/Kontext) or 256 (schnell), no mask.
* SD3: CLIP-L and CLIP-G penultimate hidden states (no final LN), concatenated (77 x 2048),
  zero-padded to T5's width and followed by T5 (padded to 256, diffusers' default) along the
  sequence; pooled = [CLIP-L text_embeds | CLIP-G text_embeds] (both projected, as diffusers does;
  SAI uses CLIP-L unprojected, which is the same when its projection is the identity).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import InputError

CLIP_MAX_LENGTH = 77


def _tokenize(tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    full = tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        warnings.warn(
            f"a prompt is longer than the {what}'s {max_length} tokens and was truncated", UserWarning, stacklevel=3
        )
    return ids


class CLIPEncoder:
    """CLIP text encoder + tokenizer. ``with_projection``: CLIPTextModelWithProjection (SD3)."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        # 77 for every real CLIP; a tokenizer may ask for fewer (tiny models)
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or min(CLIP_MAX_LENGTH, tokenizer.model_max_length)

    @classmethod
    def from_folder(
        cls, model_folder, tokenizer_folder=None, with_projection: bool = False, dtype=torch.float32, device="cpu"
    ) -> CLIPEncoder:
        """Delegates to :func:`fastflow.loading.components.load_clip` (kept for convenience)."""
        from ..loading.components import load_clip

        return load_clip(model_folder, tokenizer_folder, with_projection=with_projection, dtype=dtype, device=device)

    def tokenize(self, prompts) -> torch.Tensor:
        return _tokenize(self.tokenizer, prompts, self.max_length, "CLIP text encoder")

    @torch.no_grad()
    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (penultimate hidden states [B, 77, W] without final LN, pooled [B, W or proj])."""
        ids = self.tokenize(prompts).to(self.model.device)
        out = self.model(ids, output_hidden_states=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.hidden_states[-2], pooled


class T5Encoder:
    """T5 encoder + tokenizer; runs with no attention mask (pad tokens are attended, as the
    references do). Never in fp16: T5-XXL overflows there."""

    def __init__(self, model, tokenizer):
        if model.dtype == torch.float16:
            raise InputError("T5 overflows in float16 (NaN / black images): load it in bfloat16 or float32")
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def from_folder(cls, model_folder, tokenizer_folder=None, dtype=torch.bfloat16, device="cpu") -> T5Encoder:
        """Delegates to :func:`fastflow.loading.components.load_t5` (kept for convenience)."""
        from ..loading.components import load_t5

        return load_t5(model_folder, tokenizer_folder, dtype=dtype, device=device)

    @property
    def width(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, prompts, max_length: int) -> torch.Tensor:
        """-> last_hidden_state [B, max_length, d_model], prompts padded / truncated to max_length."""
        ids = _tokenize(self.tokenizer, prompts, max_length, "T5 encoder").to(self.model.device)
        return self.model(ids).last_hidden_state


class FluxTextEncoder:
    """prompts -> (txt [B, L, 4096] T5 states, y [B, 768] CLIP-L pooled)."""

    def __init__(self, clip_l: CLIPEncoder, t5: T5Encoder, max_length: int = 512):
        self.clip_l, self.t5, self.max_length = clip_l, t5, max_length

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        _, pooled = self.clip_l(prompts)
        return self.t5(prompts, self.max_length), pooled


class SD3TextEncoder:
    """prompts -> (context [B, 77 + L, W_t5], pooled [B, W_l + W_g]). Without T5, zeros of
    [B, t5_max_length, context_width] take its place (diffusers' behaviour)."""

    def __init__(
        self,
        clip_l: CLIPEncoder,
        clip_g: CLIPEncoder,
        t5: T5Encoder | None = None,
        t5_max_length: int = 256,
        context_width: int | None = None,
    ):
        if t5 is None and context_width is None:
            raise InputError("without T5, pass context_width (the transformer's context dim, 4096)")
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.t5_max_length = t5_max_length
        self.context_width = context_width or t5.width

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        l_seq, l_pooled = self.clip_l(prompts)
        g_seq, g_pooled = self.clip_g(prompts)
        clip = torch.cat((l_seq, g_seq), dim=-1)  # [B, 77, W_l + W_g]
        if clip.shape[-1] > self.context_width:
            raise InputError(f"CLIP features ({clip.shape[-1]}) are wider than the context ({self.context_width})")
        clip = torch.nn.functional.pad(clip, (0, self.context_width - clip.shape[-1]))
        if self.t5 is not None:
            t5 = self.t5(prompts, self.t5_max_length).to(clip.dtype)
        else:
            t5 = clip.new_zeros(clip.shape[0], self.t5_max_length, self.context_width)
        return torch.cat((clip, t5), dim=-2), torch.cat((l_pooled, g_pooled), dim=-1)


def word_level_tokenizer(words, style: str, pad_zero: bool = False, max_length: int | None = None):
    """A lower-casing word-level tokenizer (``tokenizers`` library) with CLIP-style
    (``<|startoftext|> ... <|endoftext|>``, pad = EOS, or id 0 with ``pad_zero``) or T5-style
    (``... </s>``, pad ``<pad>`` = 0) special tokens: for tiny models and tests."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style == "clip":
        specials = ["!", "<|startoftext|>", "<|endoftext|>", "<unk>"]
    elif style == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        raise ValueError(f"style must be 'clip' or 't5', got {style!r}")
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(w.lower() for w in words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
        )
        out = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<unk>",
            pad_token="!" if pad_zero else "<|endoftext|>",
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if max_length:
        out.model_max_length = max_length  # saved in tokenizer_config.json
    return out
