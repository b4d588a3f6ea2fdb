"""What :mod:`.formats` needs beyond FLUX and SD3: the SDXL UNet's names, the LoRA kinds fastflow
does not apply (refused by name, never dropped), and the text-encoder keys of SDXL files.

SDXL LoRAs come in three layouts, all read:

* diffusers / PEFT on diffusers' UNet2DConditionModel names
  (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``; also the
  older attention-processor names ``...attn1.processor.to_q_lora.down.weight``);
* kohya / sd-scripts on the official (sgm / ldm) names, which are ours
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight``, ``.alpha``);
* kohya names in the diffusers layout (``lora_unet_down_blocks_1_attentions_0_..._to_q``).

Kinds refused with :class:`~fastflow.errors.LoraError` naming the kind and the first key: LoRA on
convolution layers (LoCon: 4-D down / up weights, ``lora_mid``), LyCORIS LoHa (``hada_``) and LoKr
(``lokr_``), DoRA (``dora_scale`` / PEFT's ``lora_magnitude_vector``), OFT / BOFT, LyCORIS full
and norm diffs. Text-encoder keys (``lora_te1_`` / ``lora_te2_`` / ``text_encoder.`` /
``text_encoder_2.``) are not applied: on SDXL they are refused unless the caller asks for the UNet
part alone (``unet_only=True``)."""

from __future__ import annotations

import re

import torch

from ..errors import LoraError

# substrings that name an SDXL UNet layer (official and diffusers layouts, dotted or kohya's underscores)
SDXL_HINTS = ("input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks", "mid_block")
# the text encoders' keys in SDXL LoRA files (kohya te1 / te2, diffusers text_encoder / text_encoder_2)
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1_", "te2_")

# (pattern in a key, kind): the LoRA kinds whose math is not a low-rank product on a linear layer
_KINDS = (
    (re.compile(r"\.hada_(w[12]_[ab]|t[12])$"), "LyCORIS LoHa (Hadamard product)"),
    (re.compile(r"\.lokr_(w[12](_[ab])?|t2)$"), "LyCORIS LoKr (Kronecker product)"),
    (re.compile(r"\.(dora_scale|lora_magnitude_vector(\.weight)?)$"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon (LoRA on a convolution layer, Tucker form)"),
    (re.compile(r"\.(oft_blocks|oft_diag|oft_r)(\.weight)?$|\.boft_"), "OFT / BOFT (orthogonal fine-tuning)"),
    (re.compile(r"\.(diff|diff_b)$"), "LyCORIS full (a weight difference)"),
    (re.compile(r"\.(w_norm|b_norm)$"), "LyCORIS norm (a normalization-layer difference)"),
)
_DOWN_UP = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora.down.weight",
            ".lora.up.weight")  # fmt: skip
_LEGACY = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")  # diffusers' LoRAAttnProcessor files


def refuse_unsupported_kinds(state: dict[str, torch.Tensor], path) -> None:
    """A :class:`LoraError` naming the kind and the first key of a LoRA kind fastflow does not
    apply; nothing of such a file is loaded (applying its plain LoRA keys alone would give another
    image than the file's)."""
    for key, tensor in state.items():
        kind = next((k for pattern, k in _KINDS if pattern.search(key)), None)
        if kind is None and key.endswith(_DOWN_UP) and tensor.dim() == 4:
            kind = "LoCon (LoRA on a convolution layer: 4-D down / up weights)"
        if kind is not None:
            raise LoraError(
                path, f"this is a {kind} file (key {key!r}); fastflow applies plain LoRA on linear layers only",
                "use a plain LoRA (lora_A / lora_B or lora_down / lora_up matrices on attention and linear "
                "layers), or merge this one into the model's weights with its trainer's tools and load that",
            )  # fmt: skip


def legacy_module(name: str) -> str:
    """diffusers' older attention-processor names onto the module ones:
    ``attn1.processor.to_q_lora`` -> ``attn1.to_q``, ``...to_out_lora`` -> ``to_out.0``."""
    m = _LEGACY.search(name)
    if m is None:
        return name
    target = "to_out.0" if m[1] == "to_out" else m[1]
    return name[: m.start()] + "." + target


def text_encoder_keys(keys) -> list[str]:
    return sorted(k for k in keys if k.startswith(TEXT_ENCODER_PREFIXES))


def refuse_text_encoder_keys(keys, path) -> None:
    """SDXL: a LoRA with text-encoder keys is refused (they change the prompt embeddings, which
    fastflow does not LoRA yet) unless the caller asked for the UNet part alone."""
    found = text_encoder_keys(keys)
    if found:
        raise LoraError(
            path, f"{len(found)} key(s) of this LoRA are for SDXL's text encoders (first: {found[0]}), which "
            "fastflow does not apply LoRA to yet",
            "pass unet_only=True to load_lora to apply its UNet part alone (prompts are then encoded without "
            "the LoRA, so images differ from the trainer's), or use a LoRA trained on the UNet only",
        )  # fmt: skip


def metadata_alphas(state: dict[str, torch.Tensor], metadata: dict[str, str], path) -> dict[str, torch.Tensor]:
    """The ``.alpha`` tensors that diffusers' ``lora_adapter_metadata`` header entry stands for:
    recent diffusers write PEFT's config there (``{"unet.r": 4, "unet.lora_alpha": 8, ...}``) instead
    of alpha keys; each prefix's ``lora_alpha`` is the alpha of that prefix's modules without one.
    Per-module patterns (``alpha_pattern`` / ``rank_pattern``) are refused, never approximated."""
    import json

    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise LoraError(path, "its lora_adapter_metadata header entry is not JSON", "re-download the file") from None
    if not isinstance(config, dict):
        raise LoraError(path, "its lora_adapter_metadata header entry is not a JSON object", "re-download the file")
    out = {}
    for key, value in config.items():
        prefix, _, field = str(key).rpartition(".")
        if field in ("alpha_pattern", "rank_pattern") and value:
            raise LoraError(path, f"its metadata gives per-module {field} ({key}), which fastflow does not read",
                            "save the LoRA with one rank and alpha, or with kohya .alpha keys")  # fmt: skip
        if field != "lora_alpha" or not prefix:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoraError(path, f"metadata {key} = {value!r} is not a number", "re-download the file")
        for k in state:
            module = k.removesuffix(".lora_A.weight")
            if k.startswith(prefix + ".") and module != k and f"{module}.alpha" not in state:
                out[f"{module}.alpha"] = torch.tensor(float(value))
    return out
