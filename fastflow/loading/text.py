"""Text encoders (CLIP, T5) through the same checks as the transformer.

transformers' ``from_pretrained`` random-initialises a missing tensor with a log line, reads
files wherever a symlink points and builds whatever size ``config.json`` asks for. Here the config
is bounded to the sizes of the known families, our module (:mod:`fastflow.models.text`) is built on
the meta device, every file name, shape and dtype is checked against it (missing tensors are a
:class:`MissingKeysError`, never random init), and only then are the weights copied, through the
same validated reader as the transformer's: the same stages (source -> config -> plan ->
materialize), with the config from ``config.json`` or the tensor shapes. transformers is not imported.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, TooLargeError
from .fields import check as check_fields
from .keymaps import Segment
from .layout import Layout
from .materialize import materialize
from .plan import LoadPlan, on_meta, validate
from .source import folder_json, open_checkpoint

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
# Tensors some writers add that the module does not hold: buffers older transformers saved, and
# CLIP-L's projection when the model is used without it (FLUX reads the pooled output).
_IGNORABLE_SUFFIXES = ("position_ids", "logit_scale")


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


def text_config(raw: dict, family: str, path: Path):
    """Our config dataclass from a transformers config.json (its defaults where a field is absent)."""
    from ..models.text import ACTIVATIONS, CLIPTextConfig, T5EncoderConfig

    cls = CLIPTextConfig if family == "clip" else T5EncoderConfig
    check_fields(family, raw, path)
    fields = {f.name: raw[f.name] for f in dataclasses.fields(cls) if f.name in raw}
    if family == "t5" and raw.get("is_decoder"):
        raise CheckpointError(path, "config.json describes a T5 decoder", "pass the T5 encoder's folder")
    for name in ("layer_norm_eps", "layer_norm_epsilon"):
        value = fields.get(name)
        if name in fields and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise CheckpointError(path, f"config.json field {name!r} is {value!r}", "re-download config.json")
    for name, value in fields.items():
        if isinstance(value, float) and name in CONFIG_BOUNDS[family] and value.is_integer():
            fields[name] = int(value)
    if family == "clip" and fields.get("eos_token_id") is not None and not isinstance(fields["eos_token_id"], int):
        fields["eos_token_id"] = 2  # a list (several EOS ids): the legacy argmax rule
    config = cls(**{k: v for k, v in fields.items() if v is not None})
    act = config.hidden_act if family == "clip" else config.act
    if act not in ACTIVATIONS or (family == "t5" and config.feed_forward_proj.count("-") > 1):
        raise CheckpointError(
            path,
            f"config.json asks for activation {act!r}, which fastflow's {family.upper()} does not implement",
            f"supported: {', '.join(sorted(ACTIVATIONS))}",
        )
    return config


def _build(family: str, config, projection: bool) -> torch.nn.Module:
    from ..models.text import CLIPTextModel, T5EncoderModel

    with on_meta():
        return CLIPTextModel(config, projection) if family == "clip" else T5EncoderModel(config)


# Other names a file may use for a module key: transformers' older ``text_model.`` prefix; T5's
# embedding, which transformers ties to ``encoder.embed_tokens``.
def _file_key(key: str, present) -> str:
    """The file's name for module key ``key``."""
    candidates = (key, "text_model." + key, key.removeprefix("text_model."))
    if key == "shared.weight":
        candidates += ("encoder.embed_tokens.weight",)
    for candidate in candidates:
        if candidate in present:
            return candidate
    return key


def _ignorable(key: str, model_keys) -> bool:
    if key.endswith(_IGNORABLE_SUFFIXES) or key == "encoder.embed_tokens.weight":
        return True
    projection = key.removeprefix("text_model.") == "text_projection.weight"
    return projection and "text_projection.weight" not in model_keys


def config_from_shapes(family: str, shapes: dict[str, tuple[int, ...]], path: Path):
    """The config of a single-file text encoder (no config.json: clip_l / clip_g / t5xxl
    ``.safetensors``) from its tensor shapes. CLIP's heads are width / 64 and its activation is
    quick_gelu at width 768 (OpenAI CLIP-L) and gelu otherwise (OpenCLIP, e.g. bigG); T5's heads come
    from its relative-attention bias table, a gated MLP means gated-GELU."""
    from ..models.text import CLIPTextConfig, T5EncoderConfig

    def shape(*names):
        for name in names:
            for key in (name, "text_model." + name):
                if key in shapes:
                    return shapes[key]
        raise CheckpointError(path, f"not a {family.upper()} text encoder file (no {names[0]})", "check the file")

    def count(pattern):
        found = {int(m[1]) for k in shapes if (m := re.search(pattern, k))}
        return max(found) + 1 if found else 0

    if family == "clip":
        vocab, width = shape("embeddings.token_embedding.weight")
        projection = shapes.get("text_projection.weight") or shapes.get("text_model.text_projection.weight")
        return CLIPTextConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=count(r"encoder\.layers\.(\d+)\."), num_attention_heads=max(1, width // 64),
            max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
            hidden_act="quick_gelu" if width == 768 else "gelu", projection_dim=projection[0] if projection else width,
        )  # fmt: skip
    vocab, d_model = shape("shared.weight", "encoder.embed_tokens.weight")
    buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = any(k.endswith("DenseReluDense.wi_0.weight") for k in shapes)
    d_ff = shape("encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    return T5EncoderConfig(
        vocab_size=vocab, d_model=d_model, d_kv=shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0] // heads,
        d_ff=d_ff, num_layers=count(r"encoder\.block\.(\d+)\."), num_heads=heads,
        relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
    )  # fmt: skip


# SDXL's official single files hold both text encoders (sgm's ``conditioner.embedders``): CLIP-L
# with transformers' names, OpenCLIP-G in open_clip's layout.
SDXL_EMBEDDERS = {"clip_l": "conditioner.embedders.0.transformer.", "clip_g": "conditioner.embedders.1.model."}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def openclip_source(key: str) -> Segment:
    """Where open_clip's text-tower layout holds one tensor of our CLIP (transformers' names): q / k
    / v are thirds of the fused ``in_proj``, ``text_projection`` is stored as [width, proj]."""
    simple = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    if key in simple:
        return Segment(simple[key])
    if key == "text_projection.weight":
        return Segment("text_projection", transpose=True)
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        block, part, param = f"transformer.resblocks.{m[1]}", m[2], m[3]
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj", part)
        if qkv:
            return Segment(f"{block}.attn.in_proj_{param}", half="qkv".index(qkv[1]), parts=3)
        if part in _OPENCLIP_LAYER:
            return Segment(f"{block}.{_OPENCLIP_LAYER[part]}.{param}")
    raise KeyError(f"no open_clip source known for CLIP tensor {key!r}")


def _embedded(source, role: str | None) -> tuple[str, bool] | None:
    """(prefix, open_clip layout) of ``role``'s text encoder inside an SDXL single file, or None."""
    prefix = SDXL_EMBEDDERS.get(role or "")
    if prefix is None or not any(k.startswith(prefix) for k in source.key_file):
        return None
    return prefix, role == "clip_g"


def load_text_model(
    family: str,
    folder: Path,
    what: str,
    dtype: torch.dtype,
    device,
    projection: bool = False,
    role: str | None = None,
):
    """Our CLIP (``family="clip"``, with ``text_projection`` when ``projection``) or T5 encoder
    from a local folder of safetensors weights and config.json, from one official single file
    (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``: the config read from the shapes), or, for
    ``role`` "clip_l" / "clip_g", from an SDXL single file's ``conditioner.embedders``; validated
    before any weight is read."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CheckpointError(folder, f"{what} folder not found", f"pass the local folder holding the {what}")
    with open_checkpoint(folder, "text_encoder") as source:  # headers only; refuses pickle-only folders
        embedded = _embedded(source, role) if folder.is_file() else None
        if embedded is not None:
            return _load_embedded(source, family, folder, embedded, dtype, device, projection)
        if folder.is_file():
            config = config_from_shapes(family, source.shapes(), folder)
        else:
            raw = folder_json(folder, "config.json")
            if not raw:
                raise CheckpointError(
                    folder, f"no config.json for the {what}", "pass the text encoder's diffusers folder"
                )
            check_text_config(raw, family, folder / "config.json")
            config = text_config(raw, family, folder / "config.json")
        model = _build(family, config, projection)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        present = set(source.key_file)
        plan = {k: [Segment(_file_key(k, present))] for k in expected}
        used = {segs[0].key for segs in plan.values()}
        keys = tuple(k for k in present if k in used or not _ignorable(k, expected))
        validate(source, Layout("text_encoder", None, "", keys, (), ()), plan, expected)
        return materialize(source, LoadPlan(model, plan, expected, dtype, device))


def _load_embedded(source, family: str, path: Path, embedded, dtype, device, projection: bool):
    """One text encoder of an SDXL single file: its keys (under ``prefix``) are planned onto our
    module; the other components' keys are left alone."""
    prefix, openclip = embedded
    own = {k[len(prefix) :]: v for k, v in source.shapes().items() if k.startswith(prefix)}
    if openclip:  # the shapes config_from_shapes reads, under transformers' names
        layer0 = "transformer.resblocks.0."
        named = {
            "embeddings.token_embedding.weight": own.get("token_embedding.weight"),
            "embeddings.position_embedding.weight": own.get("positional_embedding"),
            "encoder.layers.0.mlp.fc1.weight": own.get(layer0 + "mlp.c_fc.weight"),
            **{f"encoder.layers.{i}.": (1,) for i in range(_count(own, r"transformer\.resblocks\.(\d+)\."))},  # depth
        }
        if "text_projection" in own:
            named["text_projection.weight"] = tuple(reversed(own["text_projection"]))
        shapes = {k: v for k, v in named.items() if v is not None}
    else:
        shapes = own
    config = config_from_shapes(family, shapes, path)
    model = _build(family, config, projection)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if openclip:
        plan = {k: [dataclasses.replace(openclip_source(k), key=prefix + openclip_source(k).key)] for k in expected}
    else:
        plan = {k: [Segment(prefix + _file_key(k, own))] for k in expected}
    used = {s.key for segs in plan.values() for s in segs}
    keys = tuple(k for k in own if prefix + k in used or not _ignorable(k, expected))
    validate(source, Layout("text_encoder", None, prefix, keys, (), ()), plan, expected)
    return materialize(source, LoadPlan(model, plan, expected, dtype, device))


def _count(shapes, pattern: str) -> int:
    found = {int(m[1]) for k in shapes if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0
