"""Fuzz surface ``sdxl``: a tiny SDXL diffusers folder with one field of unet/config.json,
vae/config.json, scheduler/scheduler_config.json or model_index.json mutated (types, negatives,
zero, huge, unknown fields, values that change the math), and single files in Stability's layout
with extra sgm keys (``denoiser.sigmas`` and the like) or no metadata.

A changed field that loads and gives exactly the unmutated folder's image is ``ignored`` (unless
it is listed in IRRELEVANT); a valid single file refused is ``refused_valid``; a non-finite image
is ``nonfinite``."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
H, W = 32, 32
CONFIGS = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "model_index.json")
# fields whose value does not change an image here: bookkeeping, training-only, other schedulers'
# options, fp16-only switches, and sigma_min / sigma_max (diffusers' Euler reads them only with
# karras / exponential / beta sigmas)
IRRELEVANT = {"_diffusers_version", "_class_name", "_name_or_path", "force_upcast", "sample_size",
              "clip_sample", "clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio", "thresholding",
              "lower_order_final", "euler_at_final", "solver_order", "algorithm_type", "solver_type",
              "variance_type", "use_lu_lambdas", "lambda_min_clipped", "set_alpha_to_one", "skip_prk_steps",
              "sigma_min", "sigma_max", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
              "unet", "vae", "image_encoder", "feature_extractor", "force_zeros_for_empty_prompt",
              "add_watermarker", "shift_factor",
              "dropout",  # off at inference
              "addition_embed_type_num_heads",  # read only by the "text" / "text_image" added embeddings
              }  # fmt: skip
SGM_EXTRAS = ("denoiser.sigmas", "denoiser.log_sigmas", "alphas_cumprod", "alphas_cumprod_prev", "betas",
              "model_ema.decay", "model_ema.num_updates",
              "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")  # fmt: skip
_WEIRD = [None, True, False, -1, 0, 1.5, -64, 2**31, 10**9, 1e-12, "x", "", [], [1], {}, {"a": 1},
          "v_prediction", "sample", "epsilon", "leading", "trailing", "linspace", "scaled_linear",
          "squaredcos_cap_v2", 8, 16, 1, 3]  # fmt: skip
_STATE: dict = {}


def build_seeds(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import fastflow

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.conftest import tiny_pipeline_folder

    folder = tiny_pipeline_folder(root / "sdxl-tiny", "sdxl-tiny")
    ref = fastflow.load(folder, device="cpu", dtype=torch.float32)
    state = {f"model.diffusion_model.{k}": v for k, v in ref.unet.state_dict().items()}
    state |= {f"first_stage_model.{k}": v for k, v in ref.vae.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "single.safetensors"))


def _image(pipe):
    import torch

    pipe.set_progress_bar_config(disable=True)
    # decoded, so the VAE's fields count too (a latent never meets the VAE's scale or decoder)
    return pipe("a seven", height=H, width=W, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def _baseline(seeds_root: Path):
    import torch

    import fastflow

    if "base" not in _STATE:
        _STATE["base"] = _image(fastflow.load(seeds_root / "sdxl-tiny", device="cpu", dtype=torch.float32))
    return _STATE["base"]


def _mutate_config(rng: random.Random, folder: Path) -> tuple[str, str | None]:
    """Mutate one field; returns (description, the field if its value changed, else None)."""
    rel = rng.choice(CONFIGS)
    path = folder / rel
    data = json.loads(path.read_text())
    op = rng.randrange(10)
    if op == 0:
        name = rng.choice(
            ["fuzz_unknown", "norm_type", "attention_type", "upcast_attention", "reverse_transformer_layers_index"]
        )
        data[name] = rng.choice(_WEIRD)
        path.write_text(json.dumps(data))
        return f"{rel}: added {name}={data[name]!r}", None
    if op == 1:
        path.write_text(rng.choice(["[]", "null", '{"a":' * 3000 + "1" + "}" * 3000, json.dumps(data)[:40]]))
        return f"{rel}: junk JSON", None
    name = rng.choice(sorted(data))
    old = data[name]
    if op == 2:
        del data[name]
        path.write_text(json.dumps(data))
        return f"{rel}: removed {name}", None
    if isinstance(old, list) and old and rng.random() < 0.5:
        new = list(old)
        i = rng.randrange(len(new))
        new[i] = rng.choice([*_WEIRD, (new[i] * 2 if isinstance(new[i], (int, float)) else new[i])])
    elif isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.5:
        new = rng.choice([old * 2, old / 2, -old, old + 1, 0, old * 1000])
    else:
        new = rng.choice(_WEIRD)
    data[name] = new
    path.write_text(json.dumps(data))
    changed = name if (type(new) is not type(old) or new != old) and not name.startswith("_") else None
    return f"{rel}: {name} {old!r} -> {new!r}", changed


def run_case(case: tuple, seed: int, seeds_root: Path, work: Path) -> dict:
    import torch
    from fuzz_common import judge_exception
    from safetensors.torch import load_file, save_file

    import fastflow

    surface, index = case
    rng = random.Random(f"{seed}/{surface}/{index}")
    result = {"case": index, "surface": surface}
    base = _baseline(seeds_root)
    folder = work / "sdxl"
    shutil.copytree(seeds_root / "sdxl-tiny", folder)
    changed, single = None, rng.random() < 0.25
    try:
        if single:
            state = load_file(str(seeds_root / "single.safetensors"))
            extra = rng.sample(SGM_EXTRAS, rng.randrange(0, 3))
            for k in extra:
                state[k] = (
                    torch.linspace(0.03, 14.6, 1000) if "sigma" in k or "alpha" in k or "beta" in k else torch.tensor(7)
                )
            name = rng.choice(["sd_xl_base_1.0.safetensors", "myFinetune_v2.safetensors", "model.safetensors"])
            path = work / name
            save_file(state, str(path))
            result["desc"] = f"single file {name} with {extra or 'no extra keys'}, no metadata"
            text = {"clip_l": (folder / "text_encoder", folder / "tokenizer"),
                    "clip_g": (folder / "text_encoder_2", folder / "tokenizer_2")}  # fmt: skip
            load = lambda: fastflow.load(path, dtype=torch.float32, device="cpu", text_encoders=text)  # noqa: E731
        else:
            result["desc"], changed = _mutate_config(rng, folder)
            load = lambda: fastflow.load(folder, dtype=torch.float32, device="cpu")  # noqa: E731
        image = _image(load())
    except Exception as e:  # noqa: BLE001 - the point of the fuzzer
        result.update(judge_exception(e))
        if result["outcome"] == "typed" and single:
            result["outcome"] = "refused_valid"
        return result
    except BaseException as e:  # noqa: BLE001
        result.update(outcome="untyped", error=repr(e)[:300])
        return result
    if not bool(torch.isfinite(image).all()):
        result.update(outcome="nonfinite", error="loaded, and the image is not finite")
    elif changed and changed not in IRRELEVANT and torch.equal(image, base):
        result.update(outcome="ignored", error=f"{changed} changed, output identical to the unmutated folder's")
    else:
        result["outcome"] = "ok"
    return result
