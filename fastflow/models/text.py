"""Text encoders: thin wrappers over transformers' CLIP and T5 encoders, from local folders only.

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
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError

CLIP_MAX_LENGTH = 77


def _local_folder(path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(path, f"{what} folder not found", f"pass the local folder holding the {what}")
    if not list(path.glob("*.safetensors")) and not list(path.glob("*.safetensors.index.json")):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise CheckpointError(
            path,
            f"no .safetensors weights for the {what} (found: {found})",
            "fastflow loads text encoders from safetensors only (never pickle .bin files)",
        )
    return path


def _load_model(cls, folder, what: str, dtype, device):
    folder = _local_folder(folder, what)
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def _load_tokenizer(folder, what: str):
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(
            folder,
            f"no tokenizer files for the {what}",
            "pass the local tokenizer folder (tokenizer.json / tokenizer_config.json)",
        )
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


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
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        model = _load_model(model_cls, model_folder, "CLIP text encoder", dtype, device)
        return cls(model, _load_tokenizer(tokenizer_folder or model_folder, "CLIP text encoder"))

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
        from transformers import T5EncoderModel

        if dtype == torch.float16:
            warnings.warn("T5 overflows in float16; loading it in bfloat16 instead", UserWarning, stacklevel=2)
            dtype = torch.bfloat16
        model = _load_model(T5EncoderModel, model_folder, "T5 encoder", dtype, device)
        return cls(model, _load_tokenizer(tokenizer_folder or model_folder, "T5 encoder"))

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
