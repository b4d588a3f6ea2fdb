"""Fuzz surfaces ``lora`` and ``fp8``: mutated LoRA files (diffusers / PEFT, kohya, BFL, XLabs
names on a tiny FLUX and SD3 pipeline) and mutated FP8 files (``fastflow quantize`` output and
ComfyUI-style scaled FP8). A file that loads must give a finite tiny image (else ``nonfinite``);
a file the issue says must be refused (integer / bool LoRA tensors, a layer under two prefixes,
non-finite values or scales) that loads is a ``mismatch``; an unmutated file refused is
``refused_valid``."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H, W = 24, 32
_PIPES: dict = {}


def _pipeline_folder(root: Path, variant: str) -> Path:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_pipeline_folder

    return tiny_pipeline_folder(root, variant)


def _lora_seeds(pipe, family: str) -> dict[str, dict]:
    """Valid LoRAs of each format on a few of the pipeline's layers."""
    import torch

    from fastflow.adapters.formats import linear_layers

    g = torch.Generator().manual_seed(0)
    layers = sorted(linear_layers(pipe.transformer).items())
    picks = [(n, m) for n, m in layers if "blocks.0." in n or "blocks.1." in n][:6]
    out = {"kohya": {}, "bfl": {}, "peft": {}}
    for name, m in picks:
        o, i = m.weight.shape
        a, b = torch.randn(4, i, generator=g) * 0.1, torch.randn(o, 4, generator=g) * 0.1
        k = "lora_unet_" + name.replace(".", "_")
        out["kohya"].update({f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(4.0)})
        out["bfl"].update({f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b})
        out["peft"].update({f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b})
    if family == "flux":
        c = pipe.transformer.config.hidden_size
        xl = {}
        for key, rows in (("double_blocks.0.processor.qkv_lora1", 3 * c), ("single_blocks.0.processor.proj_lora", c)):
            cols = pipe.transformer.single_blocks[0].linear2.in_features if key.startswith("single") else c
            xl[f"{key}.down.weight"] = torch.randn(4, cols, generator=g) * 0.1
            xl[f"{key}.up.weight"] = torch.randn(rows, 4, generator=g) * 0.1
        out["xlabs"] = xl
    return out


def build_seeds(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import fastflow
    from fastflow.cli import main

    for family, variant in (("flux", "flux-tiny-dev"), ("sd3", "sd3.5-tiny-medium")):
        folder = _pipeline_folder(root / variant, variant)
        pipe = fastflow.load(folder, device="cpu", dtype=torch.float32)
        for fmt, state in _lora_seeds(pipe, family).items():
            (root / "loras").mkdir(exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(root / "loras" / f"{variant}.{fmt}.safetensors")
            )
    flux = root / "flux-tiny-dev"
    (root / "fp8").mkdir()
    main(
        [
            "quantize",
            str(flux / "transformer"),
            str(root / "fp8" / "quantized.safetensors"),
            "--variant",
            "flux-tiny-dev",
        ]
    )
    state = fastflow.load_transformer(flux / "transformer", variant="flux-tiny-dev", dtype=torch.float32).state_dict()
    comfy, prefix = {}, "model.diffusion_model."
    for k, v in state.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.abs().max() / 448
            comfy[prefix + k] = (v / scale).to(torch.float8_e4m3fn)
            comfy[prefix + k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            comfy[prefix + k] = v.contiguous()
    comfy[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(comfy, str(root / "fp8" / "comfy.safetensors"), metadata={"fastflow.variant": "flux-tiny-dev"})


def _pipe(seeds_root: Path, variant: str):
    import torch

    import fastflow

    if variant not in _PIPES:
        pipe = fastflow.load(seeds_root / variant, device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[variant] = pipe
    return _PIPES[variant]


def _image(pipe, **kw):
    import torch

    w = W if "sd3" not in type(pipe).__name__.lower() else 32
    out = pipe("a seven", height=H, width=w, num_inference_steps=1, output_type="pt",
               generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip
    return out


_BAD_VALUES = [float("nan"), float("inf"), -float("inf"), 1e30]


def _mutate_tensors(rng: random.Random, state: dict, surface: str) -> tuple[str, bool]:
    """Mutate ``state`` in place; returns (description, must_refuse)."""
    import torch

    keys = sorted(state)
    key = rng.choice(keys)
    v = state[key]
    op = rng.choice(["dtype", "value", "shape", "drop", "alpha", "twice", "none", "fp64"] if surface == "lora" else
                    ["code", "scale", "scale_shape", "scale_dtype", "none"])  # fmt: skip
    if op == "none":
        return "unmutated", False
    if op == "dtype":
        dt = rng.choice([torch.int32, torch.int64, torch.uint8, torch.bool, torch.int8])
        if key.endswith(".alpha"):  # an integer alpha is read as its number (kohya's); bool / uint8 are refused
            dt = rng.choice([torch.uint8, torch.bool])
        state[key] = (v * 100).to(dt) if dt != torch.bool else v > 0
        return f"{key} as {dt}", True
    if op == "fp64":
        state[key] = v.double()
        return f"{key} as float64", False
    if op == "value":
        bad = rng.choice(_BAD_VALUES)
        v = v.clone().float()
        v.view(-1)[rng.randrange(max(v.numel(), 1))] = bad
        state[key] = v
        return f"{key} holds {bad}", True
    if op == "shape":
        if v.dim() == 0:  # an alpha: a vector or a matrix where one number belongs
            shapes = [v.reshape(1), v.reshape(1, 1).expand(2, 3)]
        else:
            shapes = [v.reshape(-1), v[..., :1], torch.cat([v, v], 0), v.t() if v.dim() == 2 else v[None]]
        new = rng.choice(shapes)
        state[key] = new.contiguous()
        return f"{key} shape {tuple(new.shape)}", False
    if op == "drop":
        del state[key]
        return f"{key} dropped", False
    if op == "alpha":
        ak = next((k for k in keys if k.endswith(".alpha")), key.rsplit(".", 2)[0] + ".alpha")
        vals = [torch.tensor(0.0), torch.tensor(-4.0), torch.tensor([1.0, 2.0]), torch.tensor(4, dtype=torch.int64)]
        val = rng.choice([*vals, torch.tensor(float("nan")), torch.tensor(1e30), torch.tensor(True)])
        state[ak] = val
        bad = (
            not bool(torch.isfinite(val.float()).all())
            or val.dtype in (torch.bool,)
            or float(val.float().abs().max()) > 1e20
        )
        return f"{ak} = {val.tolist()} ({val.dtype})", bad
    if op == "twice":
        prefixes = ("transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")
        own = next((p for p in prefixes[::-1] if key.startswith(p)), None)
        if own is None:  # kohya names: no second spelling of the prefix
            state[key] = v.double()
            return f"{key} as float64", False
        layer = key[len(own) :].split(".lora")[0]
        other = rng.choice([p for p in prefixes if p != own])
        for k in [k for k in keys if k.startswith(own + layer + ".")]:
            state[other + k[len(own) :]] = state[k].clone()
        return f"{layer} under {own} and {other}", True
    # fp8
    scales = [k for k in keys if k.endswith(("scale_weight", "weight_scale", "scale_input", "input_scale"))]
    if op == "code":
        codes = [k for k in keys if state[k].dtype == torch.float8_e4m3fn and state[k].numel()]
        k = rng.choice(codes)
        raw = state[k].clone().view(torch.uint8)
        raw.view(-1)[rng.randrange(raw.numel())] = rng.choice([0x7F, 0xFF])  # e4m3fn NaN codes
        state[k] = raw.view(torch.float8_e4m3fn)
        return f"{k} holds a NaN code", True
    k = rng.choice(scales)
    s = state[k]
    if op == "scale":
        bad = rng.choice([0.0, -1.0, 1e-42, 3e38, float("nan"), float("inf")])
        state[k] = torch.full_like(s, bad)
        return f"{k} = {bad}", bad != -1.0
    if op == "scale_shape":
        state[k] = torch.ones(rng.choice([(3,), (2, 2), (1, 7)]), dtype=s.dtype)
        return f"{k} shape changed", False
    state[k] = s.to(rng.choice([torch.float16, torch.int32, torch.float64]))
    return f"{k} as {state[k].dtype}", False


def run_case(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    import torch
    from fuzz_common import judge_exception
    from safetensors.torch import load_file, save_file

    import fastflow

    surface, index = case
    rng = random.Random(f"{seed}/{surface}/{index}")
    result = {"case": index, "surface": surface}
    work.mkdir(parents=True, exist_ok=True)
    seeds = sorted((seeds_root / ("loras" if surface == "lora" else "fp8")).glob("*.safetensors"))
    src = rng.choice(seeds)
    state = load_file(str(src))
    desc, must_refuse = _mutate_tensors(rng, state, surface)
    path = work / f"{surface}{index}.safetensors"
    meta = None
    if rng.random() < 0.15:
        meta = {
            rng.choice(["ss_network_alpha", "format", "x" * 300, "\x1b[31m"]): rng.choice(
                ["junk", "{", "\x00", "9" * 400]
            )
        }
        desc += f"; metadata {list(meta)[0][:10]!r}"
    if surface == "fp8" and src.name == "comfy.safetensors":
        meta = {**(meta or {}), "fastflow.variant": "flux-tiny-dev"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    raw = path.read_bytes()
    if rng.random() < 0.1:
        path.write_bytes(raw[: rng.randrange(len(raw))])
        desc, must_refuse = desc + "; truncated", True
    result["desc"] = f"{src.name}: {desc}"
    try:
        if surface == "lora":
            variant = src.name.split(".safetensors")[0].rsplit(".", 1)[0]
            pipe = _pipe(seeds_root, variant)
            try:
                pipe.load_lora(path, name="fz")
                image = _image(pipe)
            finally:
                try:
                    pipe.unload_lora()
                except Exception:  # noqa: BLE001 - a LoRA that did not load leaves nothing to unload
                    pass
        else:
            flux = seeds_root / "flux-tiny-dev"
            pipe = fastflow.load(path, variant="flux-tiny-dev", vae=flux / "vae", device="cpu", dtype=torch.float32,
                                 text_encoders={"clip_l": (flux / "text_encoder", flux / "tokenizer"),
                                                "t5": (flux / "text_encoder_2", flux / "tokenizer_2")})  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            image = _image(pipe)
    except BaseException as e:  # noqa: BLE001 - the point of the fuzzer
        result.update(
            judge_exception(e) if isinstance(e, Exception) else {"outcome": "untyped", "error": repr(e)[:300]}
        )
        if result["outcome"] == "typed" and desc == "unmutated":
            result["outcome"] = "refused_valid"
        return result
    finite = bool(torch.isfinite(torch.as_tensor(image)).all())
    if not finite:
        result.update(outcome="nonfinite", error="loaded, and the image is not finite")
    elif must_refuse:
        result.update(outcome="mismatch", error="loaded a file that must be refused")
    else:
        result["outcome"] = "ok"
    json.dumps(result)
    return result


def cleanup(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
