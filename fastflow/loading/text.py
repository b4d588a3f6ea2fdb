"""Text encoders (CLIP, T5) through the same checks as the transformer.

transformers' ``from_pretrained`` random-initialises a missing tensor with a log line, reads
files wherever a symlink points and builds whatever size ``config.json`` asks for. Here the config
is bounded to the sizes of the known families, the module is built on the meta device, every file
name, shape and dtype is checked against it (missing tensors are a :class:`MissingKeysError`,
never random init), and only then are the weights copied, through the same validated reader as
the transformer's. transformers supplies the module code and the tokenizer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..errors import CheckpointError, TooLargeError
from .detect import Layout
from .files import open_regular
from .keymaps import Segment
from .loader import materialize, validate
from .sources import folder_json, inside, open_checkpoint

# Bounds of config.json fields per family (CLIP-L: 12 x 768; OpenCLIP-G: 32 x 1280; T5-XXL: 24 x
# 4096, d_ff 10240, 64 heads), wide enough for every released size and for tiny test models.
CONFIG_BOUNDS = {
    "clip": {
        "num_hidden_layers": (1, 64),
        "hidden_size": (1, 8192),
        "num_attention_heads": (1, 128),
        "intermediate_size": (1, 65536),
        "vocab_size": (1, 1_000_000),
        "max_position_embeddings": (1, 4096),
        "projection_dim": (1, 8192),
    },
    "t5": {
        "num_layers": (1, 64),
        "d_model": (1, 16384),
        "d_kv": (1, 1024),
        "d_ff": (1, 65536),
        "num_heads": (1, 256),
        "vocab_size": (1, 1_000_000),
        "relative_attention_num_buckets": (1, 4096),
        "relative_attention_max_distance": (1, 1 << 20),
    },
}
_HEADS = {"clip": ("hidden_size", "num_attention_heads")}
MAX_TOKENIZER_FILE = 64 * 1024 * 1024
# Tensors some writers add that the module does not hold: buffers older transformers saved, and
# CLIP-L's projection when the model is used without it (FLUX reads the pooled output).
_IGNORABLE_SUFFIXES = ("position_ids",)


def _family(model_cls) -> str:
    return "t5" if "T5" in model_cls.__name__ else "clip"


def check_text_config(raw: dict, family: str, path: Path) -> None:
    """Every size field within its family's bounds, integral, and heads dividing the width."""
    for name, (low, high) in CONFIG_BOUNDS[family].items():
        if name not in raw:
            continue
        value = raw[name]
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(
                path, f"config.json field {name!r} is {value!r}, not an integer", "re-download config.json"
            )
        if not low <= value <= high:
            raise TooLargeError(
                path,
                f"config.json asks for {name}={value}, outside the {family.upper()} range {low}..{high}",
                "this is not a text encoder config fastflow knows: check or re-download config.json",
            )
    if family in _HEADS:
        width, heads = (raw.get(k) for k in _HEADS[family])
        if isinstance(width, int) and isinstance(heads, int) and width % heads:
            raise CheckpointError(
                path, f"hidden_size {width} is not divisible by num_attention_heads {heads}", "re-download config.json"
            )


def _build(model_cls, raw: dict, path: Path) -> torch.nn.Module:
    try:
        config = model_cls.config_class.from_dict(raw)
        with torch.device("meta"):
            return model_cls(config)
    except Exception as e:  # noqa: BLE001 - transformers' config validation raises its own types
        raise CheckpointError(
            path,
            f"config.json does not describe a valid {model_cls.__name__} ({type(e).__name__}: {e})",
            "re-download config.json",
        ) from None


def _file_key(key: str, present) -> str:
    """The file's name for module key ``key`` (with or without CLIP's ``text_model.`` prefix)."""
    for candidate in (key, "text_model." + key, key.removeprefix("text_model.")):
        if candidate in present:
            return candidate
    return key


def _ignorable(key: str, model_keys, model_cls) -> bool:
    if key.endswith(_IGNORABLE_SUFFIXES):
        return True
    projection = key.removeprefix("text_model.") == "text_projection.weight"
    return projection and not any(k.endswith("text_projection.weight") for k in model_keys)


def load_text_model(model_cls, folder: Path, what: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """``model_cls`` (CLIPTextModel[WithProjection] or T5EncoderModel) from a local folder of
    safetensors weights and config.json, validated before any weight is read."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(folder, f"{what} folder not found", f"pass the local folder holding the {what}")
    with open_checkpoint(folder, "text_encoder") as source:  # headers only; refuses pickle-only folders
        raw = folder_json(folder, "config.json")
        if not raw:
            raise CheckpointError(folder, f"no config.json for the {what}", "pass the text encoder's diffusers folder")
        family = _family(model_cls)
        check_text_config(raw, family, folder / "config.json")
        model = _build(model_cls, raw, folder / "config.json")
        tied = dict(getattr(model, "_tied_weights_keys", None) or {})  # alias -> source
        expected = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
        present = set(source.key_file)
        plan = {k: [Segment(_file_key(k, present))] for k in expected}
        used = {segs[0].key for segs in plan.values()}
        aliases = {_file_key(k, present) for k in tied}
        keys = tuple(k for k in present if k in used or not (k in aliases or _ignorable(k, expected, model_cls)))
        validate(source, Layout("text_encoder", None, "", keys, (), ()), plan, expected)
        state = materialize(source, plan, expected, dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers: CLIP's position ids
            if not name.endswith("position_ids"):
                raise RuntimeError(f"fastflow bug: buffer {name} of {model_cls.__name__} was not initialised")
            module, _, attr = name.rpartition(".")
            ids = torch.arange(buffer.shape[-1], device=device).expand(buffer.shape)
            model.get_submodule(module).register_buffer(attr, ids, persistent=False)
    return model.eval().requires_grad_(False)


_TOKENIZER_SUFFIXES = (".json", ".txt", ".model")


def check_tokenizer_folder(folder: Path, what: str) -> None:
    """Every tokenizer file the tokenizer may read stays inside the folder, is a regular file and
    of bounded size."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CheckpointError(folder, f"{what} tokenizer folder not found", "pass the local tokenizer folder")
    names = {p.name for p in folder.iterdir()}
    if "tokenizer_config.json" not in names and "tokenizer.json" not in names:
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


def check_tokenizer_fits(tokenizer, model, what: str, folder: Path, max_length: int | None = None) -> None:
    """Token ids must index the embedding table, and CLIP's positions must cover the prompt length."""
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer has {len(tokenizer)} tokens but the model's embedding holds {vocab}",
            "use the tokenizer that belongs to this text encoder",
        )
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length is not None and max_length > positions:
        raise CheckpointError(
            folder,
            f"the {what} tokenizer pads prompts to {max_length} tokens but the model has {positions} positions",
            "use the tokenizer that belongs to this text encoder",
        )
