"""The served pipeline: loading it (``fastflow.load`` with the server's quant / device / dtype),
preparing it (registered LoRAs, ``--compile`` and its warm-up generation) on the worker thread,
and what validation knows of it (:class:`~.protocol.ModelInfo`)."""

from __future__ import annotations

import inspect
import logging

from ..caching import POLICIES
from ..errors import InputError
from ..pipelines import sdxl
from .protocol import ModelInfo

log = logging.getLogger("fastflow.serve")

FLOW_SAMPLERS = ("euler", "heun", "dpmpp_2m")  # fastflow.samplers' solvers (tests/serve check the list)


def check_cache_name(cache) -> None:
    if cache is not None and cache not in POLICIES:
        raise InputError(f"--cache {cache!r}: a served default cache is one of {', '.join(POLICIES)}")


def load_pipeline(config):
    """``fastflow.load(config.model, ...)``: an image pipeline (a video model is refused)."""
    from .. import api

    pipe = api.load(config.model, variant=config.variant, device=config.device, dtype=config.dtype,
                    quant=config.quant)  # fmt: skip
    return pipe


def model_info(pipe) -> ModelInfo:
    """What a request may ask of ``pipe``; InputError for a pipeline fastflow serve cannot serve."""
    config = getattr(pipe, "config", None)
    family = getattr(config, "family", None)
    if family not in ("flux", "sd3", "sdxl") or not hasattr(pipe, "multiple"):
        raise InputError(f"fastflow serve serves FLUX.1, SD3 and SDXL image pipelines, not {type(pipe).__name__}")
    params = inspect.signature(pipe.__call__).parameters
    kontext = bool(getattr(config, "kontext", False))
    conditioning = getattr(config, "conditioning", None)  # FLUX.1 Fill / Canny / Depth
    if family == "flux":
        guidance = bool(config.guidance_embed)
        negative = float(pipe.defaults.get("true_cfg") or 1.0) > 1.0
    else:
        guidance = negative = True
    return ModelInfo(
        name=config.name,
        family=family,
        multiple=int(pipe.multiple),
        max_side=int(getattr(pipe, "max_side", 4 * max(pipe.default_size))),
        default_size=tuple(pipe.default_size),
        steps=int(pipe.defaults["steps"]),
        sampler=pipe.defaults["sampler"],
        samplers=sdxl.SAMPLERS if family == "sdxl" else FLOW_SAMPLERS,
        guidance=guidance,
        negative=negative,
        kontext=kontext,
        inpaint="mask_image" in params and not kontext and conditioning is None,
        img2img="strength" in params and not kontext and conditioning is None,
        fill=conditioning == "fill",
    )


def prepare(pipe, config, loras) -> ModelInfo:
    """On the worker: registered LoRAs (unfused, scale 0), then ``--compile`` and one warm-up
    generation at the default size, so that /health says ready only when requests run compiled."""
    info = model_info(pipe)
    pipe.set_progress_bar_config(disable=True)
    loras.load_registered(pipe)
    if config.compile:
        from ..compile import accelerate

        accelerate(pipe, compile=True)
        log.info("fastflow serve: warming the compiled model (one generation at the default size)")
        h, w = info.default_size
        pipe("warm-up", height=h, width=w, seed=0, progress=False)
        if config.max_batch > 1:  # the batch size changes: dynamo's one recompile happens now, not on a request
            pipe(["warm-up"] * 2, height=h, width=w, seed=[0, 1], progress=False)
    return info
