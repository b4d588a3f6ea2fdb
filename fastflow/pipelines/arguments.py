"""The arguments of a pipeline's ``__call__``, declared once: the diffusers arguments every family
takes (:data:`COMMON`), and :func:`call_arguments`, which gives a family's ``__call__`` its complete
signature (common names and the family's own arguments, in the family's order) with Python's
binding rules, so positional calls, help() and ``inspect.signature`` see every argument."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

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
        arg("sigmas"),
        arg("progress", "bool | None"),
        arg("cache"),
        arg("cache_threshold", "float | None"),
        arg("return_dict", "bool", True),
        arg("callback_on_step_end"),
        arg("callback_on_step_end_tensor_inputs", default=("latents",)),
    )
}

# Runs of common names that stand together in every family's list (diffusers' order)
PROMPTS = ("prompt", "negative_prompt")
STANDARD = ("height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "seed",
            "generator", "sampler", "output_type", "callback", "prompt_embeds", "pooled_prompt_embeds")  # fmt: skip
NEGATIVE_EMBEDS = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
CACHE = ("cache", "cache_threshold")
STEP_END = ("return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs")


def call_arguments(*arguments: str | inspect.Parameter) -> Callable[[Callable], Callable]:
    """Decorates a family's ``__call__(self, **request)``: it takes ``arguments`` (the names of
    common ones, or the family's own :func:`arg`), each positional or keyword, with their defaults,
    and its body gets all of them as keywords, under ``torch.no_grad``. A wrong call raises
    Python's own TypeError."""
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
                raise TypeError(f"{name}() takes from 1 to {len(params) + 1} positional arguments "
                                f"but {len(args) + 1} were given")  # fmt: skip
            given = dict(zip(defaults, args, strict=False))
            for key, value in kwargs.items():
                if key == "self" or key in given:
                    raise TypeError(f"{name}() got multiple values for argument {key!r}")
                if key not in defaults:
                    raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
                given[key] = value
            with torch.no_grad():
                return func(self, **{key: given.get(key, default) for key, default in defaults.items()})

        call.__signature__ = signature
        return call

    return decorate
