"""``fastflow.accelerate(pipe)``: the one-liner for a diffusers FluxPipeline / FluxKontextPipeline /
StableDiffusion3Pipeline or a fastflow pipeline."""

from __future__ import annotations

import torch

from ..errors import InputError


def _is_fastflow(pipe) -> bool:
    from ..pipelines.base import BasePipeline

    return isinstance(pipe, BasePipeline)


def accelerate(
    pipe, compile: bool = True, cache=None, quant=None, dynamic: bool | None = None, mode: str | None = None
):
    """Make ``pipe`` faster in place and return it.

    * ``compile``: the transformer and a fastflow pipeline's ControlNets (in place:
      ``module.compile``, so the pipeline keeps its objects) and the VAE's ``decode`` go through
      ``torch.compile(backend="fastflow")``. ``dynamic=None`` lets dynamo mark the changing sizes
      dynamic when a second resolution arrives: one recompile, then none for further resolutions.
      A fastflow pipeline's modulation precompute is turned off (its row lookup depends on data,
      which would break the compiled graph).
    * ``quant="fp8"`` (or an :class:`fastflow.quant.Fp8Config`): the linear layers of the
      transformer and of the ControlNets become FP8 (``fastflow.quant.quantize_``), before compiling.
    * ``cache``: a fastflow feature-caching policy ("fbcache", "deepcache:3:0", ... as for
      ``pipe(cache=...)``) used by default by every call; fastflow pipelines only.
    """
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise InputError(
            "fastflow.accelerate takes a pipeline with a .transformer: a diffusers FluxPipeline, "
            f"FluxKontextPipeline or StableDiffusion3Pipeline, or a fastflow pipeline; got {type(pipe).__name__}"
        )
    nets = list(getattr(pipe, "controlnets", None) or []) if _is_fastflow(pipe) else []
    if cache is not None:
        if not _is_fastflow(pipe):
            raise InputError(
                "cache= needs a fastflow pipeline (fastflow.load(...)); diffusers' transformers have no block "
                "loop fastflow.caching drives"
            )
        from ..caching.deepcache import resolve_for_model

        resolve_for_model(cache, None, None, None, pipe.config, pipe.transformer)  # a bad policy fails here
        pipe.defaults["cache"] = cache
    if quant is not None and quant != "none":
        from ..quant import Fp8Config, quantize_

        if quant == "fp8":
            quant = Fp8Config()
        if not isinstance(quant, Fp8Config):
            raise InputError(f"quant must be 'fp8', 'none' or a fastflow.quant.Fp8Config, got {quant!r}")
        for model in (transformer, *nets):
            quantize_(model, quant)
    if compile:
        if _is_fastflow(pipe):  # its table lookup is data-dependent: it would break the compiled graph
            pipe.defaults["precompute_modulation"] = False
        options = {"backend": "fastflow", "dynamic": dynamic, "mode": mode}
        for model in (transformer, *nets):  # the nets run in the same loop: same backend
            model.compile(**options)
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae, "decode"):
            vae.decode = torch.compile(vae.decode, **options)
    return pipe
