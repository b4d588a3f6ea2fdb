"""Stable Diffusion 3 / 3.5 text-to-image (medium, large, large-turbo), with CFG and skip-layer guidance."""

from __future__ import annotations

import torch

from ..errors import InputError, MissingComponentError
from ..samplers import cfg as cfg_combine
from ..samplers import sd3_schedule, skip_layer_guidance, slg_active
from .base import (
    BasePipeline,
    DenoiseLoop,
    PipelineOutput,
    Timer,
    as_prompt_list,
    check_steps,
    draw_noise,
    resolve_size,
)


def sd3_defaults(config) -> dict:
    """Per-variant defaults (REFERENCE.md 4.3): turbo 4 steps Euler without CFG; SD3.5 large and
    medium 40 steps, CFG 4.5, DPM++(2M) (SAI's sampler); SD3-medium diffusers' 28 steps, CFG 7, Euler."""
    if config.turbo:
        return {"steps": 4, "guidance": 0.0, "sampler": "euler"}
    if config.qk_norm:
        return {"steps": 40, "guidance": 4.5, "sampler": "dpmpp_2m"}
    return {"steps": 28, "guidance": 7.0, "sampler": "euler"}


class SD3Pipeline(BasePipeline):
    """prompt -> images with an MMDiT, the 16-channel VAE and CLIP-L + CLIP-G (+ T5)."""

    def __init__(self, transformer, vae, text_encoder=None, default_size: tuple[int, int] | None = None):
        super().__init__()
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.config = transformer.config
        self.defaults = sd3_defaults(self.config)
        self.default_size = default_size or (1024, 1024)

    @property
    def device(self) -> torch.device:
        return self.transformer.context_embedder.weight.device

    @property
    def multiple(self) -> int:
        return self.vae.downscale * self.config.patch_size

    @property
    def max_side(self) -> int:
        return self.config.pos_embed_max_size * self.multiple

    def _embeds(self, prompt, embeds, pooled, what):
        if embeds is not None:
            if pooled is None:
                raise InputError(f"{what}_embeds needs pooled {what} embeddings too")
            return embeds, pooled
        if self.text_encoder is None:
            raise MissingComponentError(
                "this pipeline has no text encoders: pass prompt embeddings, or load the model with its text encoders"
            )
        return self.text_encoder(as_prompt_list(prompt, what))

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed=None,
        generator=None,
        sampler: str | None = None,
        output_type: str = "pil",
        callback=None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        image=None,
        progress: bool | None = None,
    ) -> PipelineOutput:
        """Generate images; CFG runs when guidance_scale > 1 (cond and uncond in one batch).
        ``skip_guidance_layers`` (e.g. [7, 8, 9] for SD3.5-medium) turns on skip-layer guidance."""
        if image is not None:
            raise InputError("SD3 pipelines do not take an input image")
        timer, mcfg = Timer(), self.config
        self.check_output_type(output_type)
        steps = check_steps(self.defaults["steps"] if num_inference_steps is None else num_inference_steps)
        sampler = sampler or self.defaults["sampler"]
        guidance = float(self.defaults["guidance"] if guidance_scale is None else guidance_scale)
        do_cfg = guidance > 1.0
        height, width = resolve_size(height, width, self.default_size, self.multiple, self.max_side)
        skip = tuple(skip_guidance_layers or ())
        if any(not 0 <= i < mcfg.depth for i in skip):
            raise InputError(f"skip_guidance_layers must be block indices below {mcfg.depth}, got {list(skip)}")

        with timer.stage("encode_prompt"):
            ctx, pooled = self._embeds(prompt, prompt_embeds, pooled_prompt_embeds, "prompt")
            if do_cfg:
                if negative_prompt_embeds is None and negative_prompt is None:
                    negative_prompt = [""] * ctx.shape[0]  # the references encode "", not zeros
                elif isinstance(negative_prompt, str):
                    negative_prompt = [negative_prompt] * ctx.shape[0]
                neg_ctx, neg_pooled = self._embeds(
                    negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_prompt"
                )
        n = ctx.shape[0] * num_images_per_prompt
        ctx, pooled = (t.repeat_interleave(num_images_per_prompt, 0).to(self.device) for t in (ctx, pooled))
        if do_cfg:
            neg_ctx, neg_pooled = (
                t.repeat_interleave(num_images_per_prompt, 0).to(self.device) for t in (neg_ctx, neg_pooled)
            )
            both_ctx, both_pooled = torch.cat((neg_ctx, ctx)), torch.cat((neg_pooled, pooled))  # [uncond ; cond]

        f = self.vae.downscale
        shape = (self.vae.config.z_channels, height // f, width // f)
        if latents is None:
            x, seeds = draw_noise(n, shape, seed, generator)
        else:
            if tuple(latents.shape) != (n, *shape):
                raise InputError(f"latents must be {[n, *shape]}, got {list(latents.shape)}")
            x, seeds = latents.float().cpu(), [None] * n
        x = x.to(self.device)
        sigmas = sd3_schedule(steps, mcfg.shift)
        step_of = {float(s): i for i, s in enumerate(sigmas.tolist())}

        def velocity(x, sigma):
            t = torch.full((n,), sigma * 1000.0, device=self.device)
            if not do_cfg:
                return self.transformer(x, t, ctx, pooled)
            uncond, cond = self.transformer(torch.cat((x, x)), torch.cat((t, t)), both_ctx, both_pooled).chunk(2)
            v = cfg_combine(cond, uncond, guidance)
            if skip and slg_active(
                step_of.get(float(sigma), steps), steps, skip_layer_guidance_start, skip_layer_guidance_stop
            ):
                v_skip = self.transformer(x, t, ctx, pooled, skip_layers=skip)
                v = skip_layer_guidance(v, cond, v_skip, skip_layer_guidance_scale)
            return v

        loop = DenoiseLoop(
            self, sampler, steps, self.transformer.dtype, callback, self.progress_bar if progress is None else progress
        )
        with timer.stage("denoise"):
            x = loop.run(velocity, x, sigmas)
        settings = {
            "model": mcfg.name,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "sampler": sampler,
            "dtype": str(self.transformer.dtype).removeprefix("torch."),
            "skip_guidance_layers": list(skip) or None,
        }
        if output_type == "latent":
            return PipelineOutput(x, seeds, settings, timer.done())
        with timer.stage("decode"):
            pixels = self.vae.decode(x)
        return PipelineOutput(self.format_images(pixels, output_type), seeds, settings, timer.done())
