"""The arguments of a pipeline's ``__call__``, declared once: the diffusers arguments every family
takes (:data:`COMMON`), and :func:`call_arguments`, which gives a family's ``__call__`` its complete
signature (common names and the family's own arguments, in the family's order) with Python's
binding rules, so positional calls, help() and ``inspect.signature`` see every argument."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable

import torch

from ..errors import ArgumentError, plain_number
from .threads import threads_for_call

EMPTY = inspect.Parameter.empty
TENSOR = "torch.Tensor | None"


def arg(name: str, annotation: str = EMPTY, default=None) -> inspect.Parameter:
    """One ``__call__`` argument (annotations as strings, as the modules' own are)."""
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


COMMON = {
    p.name: p
    for p in (
        arg("prompt"),
        arg("negative_prompt"),
        arg("height", "int | None"),
        arg("width", "int | None"),
        arg("num_inference_steps", "int | None"),
        arg("guidance_scale", "float | None"),
        arg("num_images_per_prompt", "int", 1),
        arg("seed"),
        arg("generator"),
        arg("sampler", "str | None"),
        arg("output_type", "str", "pil"),
        arg("callback"),
        arg("prompt_embeds", TENSOR),
        arg("pooled_prompt_embeds", TENSOR),
        arg("negative_prompt_embeds", TENSOR),
        arg("negative_pooled_prompt_embeds", TENSOR),
        arg("latents", TENSOR),
        arg("image"),
        arg("strength", "float | None"),
        arg("mask_image"),
        arg("padding_mask_crop", "int | None"),
        arg("sigmas"),
        arg("progress", "bool | None"),
        arg("cache"),
        arg("cache_threshold", "float | None"),
        arg("ras_ratio", "float | None"),  # region-adaptive sampling (fastflow/caching/ras.py)
        arg("cache_interval", "int | None"),  # DeepCache (UNet families only: DEEPCACHE)
        arg("cache_branch", "int | None"),
        arg("return_dict", "bool", True),
        arg("callback_on_step_end"),
        arg("callback_on_step_end_tensor_inputs", default=("latents",)),
        arg("control_image"),  # FLUX.1 Canny / Depth; ControlNets (pipelines/control.py): one image per net
        arg("controlnet_conditioning_scale", "float | list[float]", 1.0),
        arg("control_guidance_start", "float | list[float]", 0.0),
        arg("control_guidance_end", "float | list[float]", 1.0),
        arg("control_mode", "int | list[int] | None"),  # FLUX union ControlNets
    )
}

# Runs of common names that stand together in every family's list (diffusers' order)
PROMPTS = ("prompt", "negative_prompt")
STANDARD = ("height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "seed",
            "generator", "sampler", "output_type", "callback", "prompt_embeds", "pooled_prompt_embeds")  # fmt: skip
NEGATIVE_EMBEDS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
CACHE = ("cache", "cache_threshold", "ras_ratio")
DEEPCACHE = ("cache_interval", "cache_branch")  # with cache="deepcache": the UNet families (SDXL, SVD)
STEP_END = ("return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs")
INPAINT = ("mask_image", "padding_mask_crop")  # with image= and strength= (pipelines/masks.py)
CONTROLNET = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


TENSORS = {"prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
           "latents", "image", "mask_image", "control_image", "sigmas", "generator"}  # fmt: skip


def plain_numbers(value):
    """numpy / 0-d torch scalars (and lists of them, as seeds) as Python numbers (errors.plain_number)."""
    if isinstance(value, (list, tuple)):
        return type(value)(plain_number(v) for v in value)
    return plain_number(value)


def check_kinds(name: str, given: dict) -> None:
    """Arguments that must be a bool or a name, checked before any use (an array or a tensor in
    their place would otherwise fail deep inside with an ambiguous-truth-value error)."""
    if "return_dict" in given and not isinstance(given["return_dict"], bool):
        raise ArgumentError(f"{name}(): return_dict must be True or False, got {given['return_dict']!r}"[:300])
    for key in ("output_type", "sampler"):
        value = given.get(key)
        if value is not None and not isinstance(value, str):
            raise ArgumentError(f"{name}(): {key} must be a name (a str), got {type(value).__name__}")


def call_arguments(*arguments: str | inspect.Parameter) -> Callable[[Callable], Callable]:
    """Decorates a family's ``__call__(self, **request)``: it takes ``arguments`` (the names of
    common ones, or the family's own :func:`arg`), each positional or keyword, with their defaults,
    and its body gets all of them as keywords, under ``torch.no_grad`` and, on a CPU, the thread
    rule of :mod:`.threads`. A wrong call raises an :class:`~fastflow.errors.ArgumentError` (an
    InputError and a TypeError) with Python's own message, and for an unknown keyword the closest
    valid name."""
    params = [COMMON[a] if isinstance(a, str) else a for a in arguments]
    defaults = {p.name: p.default for p in params}

    def decorate(func: Callable) -> Callable:
        returns = inspect.signature(func).return_annotation
        signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *params],
                                      return_annotation=returns)  # fmt: skip

        @functools.wraps(func)
        def call(self, *args, **kwargs):
            name = call.__qualname__
            if len(args) > len(params):
                raise ArgumentError(f"{name}() takes from 1 to {len(params) + 1} positional arguments "
                                f"but {len(args) + 1} were given")  # fmt: skip
            given = dict(zip(defaults, args, strict=False))
            for key, value in kwargs.items():
                if key == "self" or key in given:
                    raise ArgumentError(f"{name}() got multiple values for argument {key!r}")
                if key not in defaults and key in DEEPCACHE:
                    policies = ", ".join(getattr(self, "cache_policies", ())) or "none"
                    raise ArgumentError(f"{name}() got an unexpected keyword argument {key!r}: it is DeepCache's "
                                        f"(cache='deepcache', SDXL and SVD); this family's cache policies: "
                                        f"{policies}")  # fmt: skip
                if key not in defaults:
                    close = difflib.get_close_matches(str(key), list(defaults), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(defaults)}"
                    raise ArgumentError(f"{name}() got an unexpected keyword argument {key!r}{hint}")
                given[key] = value
            for key in given.keys() - TENSORS:
                given[key] = plain_numbers(given[key])
            check_kinds(name, given)
            with torch.no_grad(), threads_for_call(self):
                return func(self, **{key: given.get(key, default) for key, default in defaults.items()})

        call.__signature__ = signature
        return call

    return decorate
