"""FP8 and int8 checkpoints: which tensors are quantized and how they are scaled, checked before
any weight is read.

Formats read (official, ``model.diffusion_model.``-prefixed and diffusers names alike):

* plain FP8: ``float8_e4m3fn`` / ``float8_e5m2`` weights without scales (dequantized = the codes);
* scaled FP8 (ComfyUI): ``<layer>.scale_weight`` (one fp32 per tensor) and optionally
  ``<layer>.scale_input`` (a static activation scale), with a ``scaled_fp8`` marker tensor;
* fastflow's own (``fastflow quantize``): ``<layer>.weight_scale`` per output channel ([N]) or per
  tensor, optional ``<layer>.input_scale``, ``__metadata__`` ``fastflow.quant = "fp8-e4m3"``;
* fastflow's int8 (``fastflow quantize --format int8``): ``int8`` weights with a
  ``<layer>.weight_scale`` per output channel ([N]), ``fastflow.quant = "int8"``. int8 tensors are
  read only from a file whose metadata says so, only as ``.weight``s with a scale, never with a
  static ``input_scale`` (int8 activations are quantized per token at run time).

Checked, each a typed error naming the tensor (:class:`~fastflow.errors.InvalidScaleError`):

* scales are finite, positive and normal fp32 numbers (>= 1.2e-38: a denormal scale loses its
  precision and gives wrong weights), and the largest code times the scale (448 for e4m3fn, 57344
  for e5m2) stays finite in fp32 (read with the header) and in the model dtype the weights are
  dequantized to or computed in (checked as each tensor is materialized: bf16 allows the fp32
  range, fp16 a scale up to 65504 / 448 = 146 for e4m3fn);
* no code is NaN or inf (e4m3fn NaN: 0x7F / 0xFF; e5m2 inf / NaN: every code with all exponent
  bits set), scanned tensor by tensor as the loader copies it (:func:`check_codes`), never as a
  separate pass over the file;
* a scale without an FP8 or int8 weight is refused, and so is an int8 weight without its
  per-channel scale (the largest code, 127, times the scale must stay finite as for FP8).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from ..errors import InvalidScaleError, NonFiniteWeightsError, UnsupportedDtypeError
from ..quant.fp8 import dequantize_weight
from ..quant.int8 import dequantize_weight_int8
from .safetensors_io import DTYPE_NAMES

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {d: torch.finfo(d).max for d in (torch.float8_e4m3fn, torch.float8_e5m2)}  # 448, 57344
# uint8 view: the bits set in every non-finite code (e4m3fn NaN: S.1111.111; e5m2: S.11111.xx)
_NONFINITE = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}
_SCAN_CHUNK = 1 << 22  # bytes of codes checked at a time
_TINY = torch.finfo(torch.float32).tiny
WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
MARKERS = ("scaled_fp8",)
FORMAT_KEY = "fastflow.quant"
FORMAT = "fp8-e4m3"
FORMAT_INT8 = "int8"
INT8_MAX = 127
ACTIVATION_KEY = "fastflow.activation"


def split_quant_keys(keys: list[str]) -> tuple[list[str], list[str]]:
    """(model keys, quantization keys): scales whose layer has a weight here, and format markers."""
    weights = {k for k in keys if k.endswith(".weight")}
    model, quant = [], []
    for k in keys:
        base = _layer_of(k)
        if k in MARKERS or (base is not None and base + ".weight" in weights):
            quant.append(k)
        else:
            model.append(k)
    return model, quant


def _layer_of(key: str) -> str | None:
    for suffix in (*WEIGHT_SCALE_SUFFIXES, *INPUT_SCALE_SUFFIXES):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


@dataclass(frozen=True)
class Fp8Source:
    """The FP8 facts of one checkpoint component. Keys are full checkpoint keys."""

    fp8_weights: frozenset[str]  # weights stored in an FP8 dtype
    weight_scales: dict[str, torch.Tensor]  # weight key -> fp32 scale, [1] or [rows]
    input_scales: dict[str, torch.Tensor]  # weight key -> fp32 static activation scale [1]
    activation: str | None  # fastflow files name their activation scaling
    int8_weights: frozenset[str] = frozenset()  # int8 weights of a fastflow int8 file (each with its scale)

    @classmethod
    def empty(cls) -> Fp8Source:
        """No scales: FP8 tensors (if any) dequantize as their plain values."""
        return cls(frozenset(), {}, {}, None)

    @property
    def quantized(self) -> bool:
        return bool(self.fp8_weights or self.int8_weights)

    def dequantized(self, key: str, src: torch.Tensor) -> torch.Tensor:
        """The weight in fp32 (codes times scale) for an FP8 or int8 source; other tensors as they are."""
        if src.dtype == torch.int8 and key in self.int8_weights:
            return dequantize_weight_int8(src, self.weight_scales[key], torch.float32)
        if src.dtype not in FP8_DTYPES:
            return src
        scale = self.weight_scales.get(key)
        return src.float() if scale is None else dequantize_weight(src, scale, torch.float32)


def read_fp8_source(source, prefix: str, quant_keys) -> Fp8Source:
    """Check every scale (dtype, shape, value) and collect the FP8 / int8 facts; reads only the scales."""
    fp8 = frozenset(k for k, f in source.key_file.items() if f.entries[k].dtype in FP8_DTYPES and k.endswith(".weight"))
    int8 = frozenset()
    if source.metadata.get(FORMAT_KEY) == FORMAT_INT8:  # elsewhere int8 tensors stay refused (plan.validate)
        int8 = frozenset(
            k for k, f in source.key_file.items() if k.startswith(prefix) and f.entries[k].dtype == torch.int8
        )
    weight_scales, input_scales = {}, {}
    for short in quant_keys:
        key = prefix + short
        if short in MARKERS:
            continue
        layer = prefix + _layer_of(short)
        weight = layer + ".weight"
        is_weight_scale = short.endswith(WEIGHT_SCALE_SUFFIXES)
        entry = source.entry(key)
        rows = source.entry(weight).shape[0] if source.entry(weight).shape else 1
        allowed = {(), (1,)} | ({(rows,), (rows, 1)} if is_weight_scale else set())
        where = source.file_of(key)
        if weight in int8:
            allowed = {(rows,)} if is_weight_scale else set()
            _check_int8_scale(key, weight, is_weight_scale, entry, rows, where)
        if not entry.dtype.is_floating_point or entry.dtype in FP8_DTYPES:
            raise InvalidScaleError(
                where, f"scale {key!r} is {DTYPE_NAMES[entry.dtype]}, not fp32/bf16/fp16", "the file is corrupt"
            )
        if tuple(entry.shape) not in allowed:
            raise InvalidScaleError(
                where,
                f"scale {key!r} has shape {list(entry.shape)}; for weight {weight!r} ({rows} rows) it must be "
                + ("a scalar, [1], [rows] or [rows, 1]" if is_weight_scale else "a scalar or [1]"),
                "the file is corrupt or of a format fastflow does not read",
            )
        if is_weight_scale and source.entry(weight).dtype == torch.int8 and weight not in int8:
            raise UnsupportedDtypeError(
                where,
                f"{weight!r} is int8 in a file without fastflow's int8 marker (metadata fastflow.quant = "
                f"{FORMAT_INT8!r}); other int8 formats are not read",
                "re-quantize the float model with `fastflow quantize --format int8`",
            )
        if is_weight_scale and weight not in fp8 | int8:
            raise InvalidScaleError(
                where,
                f"scale {key!r} belongs to {weight!r}, which is {DTYPE_NAMES[source.entry(weight).dtype]}, "
                "not FP8 or int8",
                "the file mixes formats: re-export it",
            )
        value = source.key_file[key].tensor(key).float().reshape(-1).clone()  # [1] or [rows]
        bad = ~torch.isfinite(value) | (value <= 0)
        if bad.any():
            raise InvalidScaleError(
                where,
                f"scale {key!r} holds {value[bad][0].item()} (scales must be finite and positive)",
                "the file is corrupt: re-download or re-quantize it",
            )
        small = value < _TINY
        if small.any():
            raise InvalidScaleError(
                where,
                f"scale {key!r} holds {value[small][0].item():.3g}, a denormal number (scales must be >= {_TINY:.3g})",
                "the file is corrupt: re-download or re-quantize it",
            )
        if is_weight_scale:
            check_scale_range(key, value, source.entry(weight).dtype, torch.float32, where)
        (weight_scales if is_weight_scale else input_scales)[weight] = value if value.numel() > 1 else value[:1]
    unscaled = sorted(int8 - weight_scales.keys())
    if unscaled:
        raise InvalidScaleError(
            source.file_of(unscaled[0]),
            f"int8 tensor {unscaled[0]!r} has no per-channel weight_scale (int8 tensors must be linear "
            "weights with a scale)",
            "the file is corrupt: re-quantize it with `fastflow quantize --format int8`",
        )
    return Fp8Source(fp8, weight_scales, input_scales, source.metadata.get(ACTIVATION_KEY), int8)


def _check_int8_scale(key: str, weight: str, is_weight_scale: bool, entry, rows: int, where) -> None:
    """An int8 weight's scales: its per-channel ``weight_scale`` only ([rows], a float dtype)."""
    if not is_weight_scale:
        raise InvalidScaleError(
            where,
            f"{key!r} is a static input scale for the int8 weight {weight!r}; int8 activations are quantized "
            "per token at run time",
            "the file is corrupt or of a format fastflow does not read: re-quantize it",
        )
    if tuple(entry.shape) != (rows,):
        raise InvalidScaleError(
            where,
            f"scale {key!r} has shape {list(entry.shape)}; the int8 weight {weight!r} needs one scale per "
            f"output channel: [{rows}]",
            "the file is corrupt: re-quantize it with `fastflow quantize --format int8`",
        )


def _code_max(code_dtype: torch.dtype) -> float:
    return INT8_MAX if code_dtype == torch.int8 else FP8_MAX[code_dtype]


def check_scale_range(key: str, scale: torch.Tensor, code_dtype: torch.dtype, dtype: torch.dtype, where) -> None:
    """The largest code times ``scale`` must be finite in ``dtype`` (fp32 at read, the model dtype
    when materialized)."""
    limit = torch.finfo(dtype).max / _code_max(code_dtype)
    if scale.numel() and scale.max().item() > limit:
        raise InvalidScaleError(
            where,
            f"{key!r}: its scale {scale.max().item():.3g} x the largest code {_code_max(code_dtype):g} overflows "
            f"{str(dtype).removeprefix('torch.')} (scales up to {limit:.3g})",
            "the file is corrupt, or load it in another dtype (bfloat16 / float32)",
        )


def check_codes(key: str, codes: torch.Tensor, where) -> None:
    """Refuse NaN / inf codes in an FP8 tensor (one pass over its bytes)."""
    if codes.dtype not in _NONFINITE or not codes.numel():
        return
    mask = _NONFINITE[codes.dtype]  # a code is NaN / inf when all the mask's bits are set
    flat = codes.reshape(-1).view(torch.uint8)
    buffer = torch.empty(min(flat.numel(), _SCAN_CHUNK), dtype=torch.uint8, device=codes.device)
    for i in range(0, flat.numel(), _SCAN_CHUNK):  # in chunks: no temporary the size of the tensor
        part = flat[i : i + _SCAN_CHUNK]
        if torch.bitwise_and(part, mask, out=buffer[: part.numel()]).amax().item() == mask:
            raise NonFiniteWeightsError(
                where,
                f"FP8 tensor {key!r} holds NaN or inf codes",
                "the file is corrupt: re-download or re-quantize it",
            )


def describe(source, prefix: str, keys, quant_keys) -> str | None:
    """One line for ``fastflow info``: the quantization format, or None for a float checkpoint."""
    full = [prefix + k for k in keys]
    if source.metadata.get(FORMAT_KEY) == FORMAT_INT8:
        int8 = [k for k in full if source.entry(k).dtype == torch.int8]
        return f"fastflow int8 (per-channel scales, per-token activations): {len(int8)} of {len(full)} tensors int8"
    fp8 = [k for k in full if source.entry(k).dtype in FP8_DTYPES]
    if not fp8:
        return None
    kinds = sorted({DTYPE_NAMES[source.entry(k).dtype] for k in fp8})
    scales = [k for k in quant_keys if k.endswith(WEIGHT_SCALE_SUFFIXES)]
    statics = [k for k in quant_keys if k.endswith(INPUT_SCALE_SUFFIXES)]
    if source.metadata.get(FORMAT_KEY):
        per_channel = any(prod(source.entry(prefix + k).shape) > 1 for k in scales)
        how = f"fastflow {source.metadata[FORMAT_KEY]} ({'per-channel' if per_channel else 'per-tensor'} scales)"
    elif scales:
        how = "scaled FP8 (per-tensor scale_weight)"
    else:
        how = "FP8 without scales"
    extra = f", {len(statics)} static input scales" if statics else ""
    return f"{how}: {len(fp8)} of {len(full)} tensors {'/'.join(kinds)}{extra}"
