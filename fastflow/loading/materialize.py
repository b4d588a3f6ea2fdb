"""Stage 4 of loading, materialize: a :class:`~.plan.LoadPlan` and its open checkpoint -> the
module with every tensor filled, in eval mode with grads off.

Tensors are built one at a time from the memory map straight into their final dtype and device
(FP8 / int8 pieces dequantized on the copy, or kept / quantized into the plan's Fp8Linear /
Int8Linear layers), and
each source's pages are released as soon as it is copied: peak memory is the loaded model plus
one assembled tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError, NonFiniteWeightsError
from ..quant import Fp8Linear, Int8Linear
from ..quant.fp8 import quantize_weight
from ..quant.int8 import column_major_copy, quantize_weight_int8
from .plan import LoadPlan
from .quantized import FP8_DTYPES, Fp8Source, check_codes, check_scale_range
from .source import CheckpointSource


def _read(source: CheckpointSource, key: str, dtype: torch.dtype, fp8: Fp8Source) -> torch.Tensor:
    """The file's tensor ``key``; FP8 codes checked on the way (no NaN / inf code, the largest code
    x scale finite in ``dtype``), in the one pass that copies them."""
    codes = source.key_file[key].tensor(key)
    if codes.dtype in FP8_DTYPES:
        where = source.file_of(key)
        check_codes(key, codes, where)
        check_scale_range(key, fp8.weight_scales.get(key, torch.ones(1)), codes.dtype, dtype, where)
    elif key in fp8.int8_weights:  # every int8 code is finite: the scale's range is the check
        check_scale_range(key, fp8.weight_scales[key], codes.dtype, dtype, source.file_of(key))
    return codes


def _assemble(source: CheckpointSource, segs, shape, dtype, device, fp8: Fp8Source) -> torch.Tensor:
    """One target tensor from its source pieces, FP8 pieces dequantized (codes x scale) on the copy."""
    out = torch.empty(shape, dtype=dtype, device=device)
    row = 0
    for s in segs:
        src = s.take(fp8.dequantized(s.key, _read(source, s.key, dtype, fp8)))
        out[row : row + src.shape[0]].copy_(src)
        row += src.shape[0]
    return out


def _passthrough(source: CheckpointSource, segs, layer, fp8: Fp8Source, dtype: torch.dtype):
    """The file's e4m3 (int8) codes and scale as the layer holds them, when no arithmetic is needed
    (one whole e4m3 (int8) source; a per-tensor FP8 scale serves a per-channel layer by repetition)."""
    one = len(segs) == 1 and segs[0].half is None and not segs[0].transpose
    codes = torch.int8 if isinstance(layer, Int8Linear) else torch.float8_e4m3fn
    if not one or source.entry(segs[0].key).dtype != codes:
        return None
    if codes == torch.int8:
        return _read(source, segs[0].key, dtype, fp8), fp8.weight_scales[segs[0].key]
    key = segs[0].key
    scale = fp8.weight_scales.get(key, torch.ones(1))
    rows = layer.out_features
    if layer.weight_granularity == "per-channel":
        scale = scale.expand(rows).clone() if scale.numel() == 1 else scale
    elif scale.numel() != 1:
        return None
    return _read(source, key, dtype, fp8), scale


def build_state(source: CheckpointSource, plan: LoadPlan) -> dict[str, torch.Tensor]:
    """Build each target tensor from its sources, casting on the copy; release pages as we go.

    ``plan.fp8_layers`` (weight key -> Fp8Linear on meta) are filled with e4m3 codes and scales: the
    file's own where they fit the layer, else quantized from the assembled tensor (in ``dtype``,
    or fp32 when the source is FP8). Peak memory: the loaded model plus one assembled tensor."""
    state = {}
    fp8, expected, dtype, device = plan.fp8, plan.expected, plan.dtype, plan.device
    for key, segs in plan.keys.items():
        layer = plan.fp8_layers.get(key)
        if layer is None:
            state[key] = _assemble(source, segs, expected[key], dtype, device, fp8)
        else:
            stem = key[: -len("weight")]
            found = _passthrough(source, segs, layer, fp8, dtype)
            if found is not None and isinstance(layer, Int8Linear):  # int8 codes: column-major, one copy
                found = column_major_copy(found[0], device), found[1].to(device, copy=True)
            elif found is not None:  # views of the map (and the checked scale): copy
                found = found[0].to(device, copy=True), found[1].to(device, copy=True)
            else:
                from_codes = any(source.entry(s.key).dtype in (*FP8_DTYPES, torch.int8) for s in segs)
                full = _assemble(source, segs, expected[key], torch.float32 if from_codes else dtype, device, fp8)
                try:  # its amax pass refuses NaN / inf: named here
                    if isinstance(layer, Int8Linear):
                        found = quantize_weight_int8(full)
                    else:
                        found = quantize_weight(full, layer.weight_granularity)
                except InputError as e:
                    raise NonFiniteWeightsError(source.file_of(segs[0].key), f"tensor {key!r}: {e}",
                                                "the file is corrupt: re-download it") from None  # fmt: skip
                del full
            state[key], state[stem + "weight_scale"] = found
            if isinstance(layer, Fp8Linear) and layer.activation == "static":
                state[stem + "input_scale"] = layer.input_scale.to(device, copy=True)
        for s in segs:
            source.key_file[s.key].release(s.key)
    return state


def materialize(source: CheckpointSource, plan: LoadPlan) -> nn.Module:
    """The plan's module with its tensors from ``source``, in eval mode with grads off."""
    state = build_state(source, plan)
    plan.model.load_state_dict(state, strict=True, assign=True)
    return plan.model.eval().requires_grad_(False)
