"""CLIP and T5 text-encoder forwards, owned here (transformers is not needed to run them).

The modules keep transformers' parameter names (``embeddings.token_embedding``,
``encoder.layers.N.self_attn.q_proj``, ``encoder.block.N.layer.0.SelfAttention.q``, ``shared``), so
transformers' safetensors folders and the official single files load unchanged, and every linear
layer runs through :func:`fastflow.ops.linear` (FP8 and LoRA layers plug in there). The math is
transformers' (the parity tests hold it to 1e-5 in fp32):

* CLIP: pre-LN encoder layers with causal self-attention; the pooled output is the final-LN state
  at the EOS token (the largest id for configs with the legacy ``eos_token_id == 2``, else the
  first ``eos_token_id``), projected by ``text_projection`` when the model has one.
* T5 encoder: RMS norm with the variance in fp32, unscaled attention plus a bucketed relative
  position bias computed by the first block and shared by all, gated-GELU(tanh) or ReLU MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import InputError
from .prompt_tokens import check_vocabulary, tokenize_prompts

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    # transformers' gelu_new, spelled as it spells it (the tanh form)
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' CLIPTextConfig the forward reads (defaults are transformers')."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int = 2


@dataclass(frozen=True)
class T5EncoderConfig:
    """The fields of transformers' T5Config the encoder reads (defaults are transformers')."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        name = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name


class CLIPOutput(NamedTuple):
    penultimate: torch.Tensor  # [B, L, W] the second-to-last layer's output (no final LN)
    last_hidden_state: torch.Tensor  # [B, L, W] after the final LN
    pooler_output: torch.Tensor  # [B, W] final-LN state at EOS
    text_embeds: torch.Tensor | None  # [B, P] pooler_output @ text_projection (with a projection)


class _Module(nn.Module):
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class CLIPAttention(nn.Module):
    """Causal for the text tower; ``causal=False`` (the vision tower) runs :func:`fastflow.ops.attention`."""

    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        w = cfg.hidden_size
        self.heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(w, w) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(ops.linear(x, p), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = ops.attention(q, k, v)
        return ops.linear(out.transpose(1, 2).flatten(2), self.out_proj)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(self.act(ops.linear(x, self.fc1)), self.fc2)


class CLIPLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[-1]]


class CLIPStack(nn.Module):
    def __init__(self, cfg: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg, causal) for _ in range(cfg.num_hidden_layers))


class CLIPTextModel(_Module):
    """CLIP's text transformer; ``projection=True`` adds ``text_projection`` (CLIPTextModelWithProjection)."""

    def __init__(self, cfg: CLIPTextConfig, projection: bool = False):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPStack(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if projection else None

    def eos_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the largest id in the vocabulary
            return ids.to(torch.int).argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)

    def forward(self, ids: torch.Tensor) -> CLIPOutput:
        if ids.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"{ids.shape[-1]} tokens but {self.config.max_position_embeddings} positions")
        x = self.embeddings(ids)
        penultimate = x
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x)
            if i == len(self.encoder.layers) - 2:
                penultimate = x
        last = self.final_layer_norm(x)
        pooled = last[torch.arange(last.shape[0], device=last.device), self.eos_positions(ids)]
        embeds = None if self.text_projection is None else ops.linear(pooled, self.text_projection)
        return CLIPOutput(penultimate, last, pooled, embeds)


class T5LayerNorm(nn.Module):
    """RMS norm, no mean and no bias; variance in fp32, cast back to a half weight's dtype."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative: torch.Tensor, buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucketing: half the buckets per direction, exact up to buckets // 4, then
    logarithmic up to ``max_distance``."""
    buckets //= 2
    out = (relative > 0).to(torch.long) * buckets
    relative = relative.abs()
    exact = buckets // 2
    large = exact + (torch.log(relative.float() / exact) / math.log(max_distance / exact) * (buckets - exact)).to(
        torch.long
    )
    large = large.clamp(max=buckets - 1)
    return out + torch.where(relative < exact, relative, large)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg, self.heads = cfg, cfg.num_heads
        self.q, self.k, self.v = (nn.Linear(cfg.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device) -> torch.Tensor:
        pos = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, L, L]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_heads(ops.linear(x, p), self.heads) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return ops.linear(out.transpose(1, 2).flatten(2), self.o)


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5DenseReluDense(nn.Module):
    """Gated (``wi_0``, ``wi_1``) or plain (``wi``) feed-forward, then ``wo`` in its own dtype."""

    def __init__(self, cfg: T5EncoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.act]
        if cfg.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wi"):
            h = self.act(ops.linear(x, self.wi))
        else:
            h = self.act(ops.linear(x, self.wi_0)) * ops.linear(x, self.wi_1)
        w = self.wo.weight
        if h.dtype != w.dtype and w.is_floating_point() and w.element_size() > 1:  # not FP8 codes
            h = h.to(w.dtype)
        return ops.linear(h, self.wo)


class T5FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(cfg, has_bias), T5FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5EncoderConfig):
        super().__init__()
        self.block = nn.ModuleList(T5Block(cfg, i == 0) for i in range(cfg.num_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(_Module):
    """T5's encoder stack (``shared`` embedding, ``encoder.block.N``, ``encoder.final_layer_norm``)."""

    def __init__(self, cfg: T5EncoderConfig):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """-> last_hidden_state [B, L, d_model]."""
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[-1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# -- the encoders the pipelines call: tokenizer + model ------------------------------------------

CLIP_MAX_LENGTH = 77


class CLIPEncoder:
    """CLIP text encoder + tokenizer. ``with_projection``: CLIPTextModelWithProjection (SD3)."""

    def __init__(self, model, tokenizer, max_length: int | None = None):
        # 77 for every real CLIP; a tokenizer may ask for fewer (tiny models)
        check_vocabulary(tokenizer, model.embeddings.token_embedding, "CLIP text encoder")
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or min(CLIP_MAX_LENGTH, tokenizer.model_max_length or CLIP_MAX_LENGTH)

    def tokenize(self, prompts) -> torch.Tensor:
        return tokenize_prompts(self.tokenizer, prompts, self.max_length, "CLIP text encoder")

    @torch.no_grad()
    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (penultimate hidden states [B, 77, W] without final LN, pooled [B, W or proj])."""
        out = self.model(self.tokenize(prompts).to(self.model.device))
        return out.penultimate, out.pooler_output if out.text_embeds is None else out.text_embeds


class T5Encoder:
    """T5 encoder + tokenizer; runs with no attention mask (pad tokens are attended, as the
    references do). Never in fp16: T5-XXL overflows there."""

    def __init__(self, model, tokenizer):
        if model.dtype == torch.float16:
            raise InputError("T5 overflows in float16 (NaN / black images): load it in bfloat16 or float32")
        check_vocabulary(tokenizer, model.shared, "T5 encoder")
        self.model, self.tokenizer = model, tokenizer

    @property
    def width(self) -> int:
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, prompts, max_length: int) -> torch.Tensor:
        """-> last_hidden_state [B, max_length, d_model], prompts padded / truncated to max_length."""
        ids = tokenize_prompts(self.tokenizer, prompts, max_length, "T5 encoder").to(self.model.device)
        return self.model(ids)


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


class SDXLTextEncoder:
    """prompts -> (context [B, 77, W_l + W_g]: both CLIPs' penultimate hidden states side by side,
    pooled [B, P]: OpenCLIP-G's projected pooled output), as SDXL is conditioned."""

    def __init__(self, clip_l: CLIPEncoder, clip_g: CLIPEncoder):
        self.clip_l, self.clip_g = clip_l, clip_g

    def __call__(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        l_seq, _ = self.clip_l(prompts)
        g_seq, g_pooled = self.clip_g(prompts)
        if l_seq.shape[1] != g_seq.shape[1]:
            raise InputError(f"the CLIP tokenizers' lengths differ ({l_seq.shape[1]} vs {g_seq.shape[1]})")
        return torch.cat((l_seq, g_seq.to(l_seq.dtype)), dim=-1), g_pooled


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
