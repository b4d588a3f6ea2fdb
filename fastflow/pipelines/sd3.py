"""Stable Diffusion 3 / 3.5 text-to-image (medium, large, large-turbo), with CFG and skip-layer guidance."""

from __future__ import annotations

import torch

from ..errors import InputError, check_scale, plain_number
from ..samplers import cfg as cfg_combine
from ..samplers import sd3_schedule, skip_layer_guidance, slg_active
from . import masks
from .arguments import CACHE, CONTROLNET, INPAINT, NEGATIVE_EMBEDS, PROMPTS, STANDARD, STEP_END, arg, call_arguments
from .base import BasePipeline
from .control import check_control
from .outputs import PipelineOutput
from .settings import resolve_size
from .template import Plan

SKIP_LAYER_GUIDANCE = (  # SD3.5's __call__ arguments beyond the common ones (diffusers' names and defaults)
    arg("skip_guidance_layers", "list[int] | None"),
    arg("skip_layer_guidance_scale", "float", 2.8),
    arg("skip_layer_guidance_start", "float", 0.01),
    arg("skip_layer_guidance_stop", "float", 0.2),
)


def check_layers(layers) -> tuple[int, ...]:
    """``skip_guidance_layers``: None or a list / tuple of block indices (ints, numpy ints too)."""
    if layers is None:
        return ()
    values = [plain_number(i) for i in layers] if isinstance(layers, (list, tuple)) else None
    if values is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
        raise InputError(f"skip_guidance_layers must be a list of block indices (ints), got {layers!r}")
    return tuple(values)


class SD3Pipeline(BasePipeline):
    """prompt -> images with an MMDiT, the 16-channel VAE and CLIP-L + CLIP-G (+ T5). Sampling
    defaults come from the model config (``config.sampling``)."""

    @property
    def weights_device(self) -> torch.device:
        return self.transformer.context_embedder.weight.device

    @property
    def multiple(self) -> int:
        return self.vae.downscale * self.config.patch_size

    @property
    def max_side(self) -> int:
        return self.config.pos_embed_max_size * self.multiple

    @call_arguments(*PROMPTS, *STANDARD, *NEGATIVE_EMBEDS, "latents", *SKIP_LAYER_GUIDANCE, "image", "strength",
                    "progress", *CACHE, "sigmas", *STEP_END, *INPAINT, *CONTROLNET)  # fmt: skip
    def __call__(self, **request) -> PipelineOutput:
        """Generate images; CFG runs when guidance_scale > 1 (cond and uncond in one batch).
        ``control_image`` & co.: ControlNets (pipelines/control.py, diffusers' SD3 ControlNet pipeline).
        ``skip_guidance_layers`` (e.g. [7, 8, 9] for SD3.5-medium) turns on skip-layer guidance.
        ``image``: image-to-image as diffusers' StableDiffusion3Img2ImgPipeline, from the sigma
        ``strength`` (default 0.6) selects; the output size defaults to the image's.
        ``mask_image`` (with ``image``): inpainting as diffusers' StableDiffusion3InpaintPipeline,
        white pixels repainted, ``strength`` (default 0.6) and ``padding_mask_crop`` as there."""
        return masks.generate(self, request)

    def prepare(self, timer, r) -> Plan:
        mcfg = self.config
        steps, sampler = self.sampling(r.num_inference_steps, r.sampler, r.sigmas)
        guidance = check_scale(
            self.defaults["guidance"] if r.guidance_scale is None else r.guidance_scale, "guidance_scale"
        )
        do_cfg = guidance > 1.0
        if r.strength is not None and r.image is None:
            raise InputError("strength needs an input image (image=)")
        masks.check_request(r, "SD3")
        inpaint = None
        default_size = self.default_size if r.image is None else self.image_size(r)
        height, width = resolve_size(r.height, r.width, default_size, self.multiple, self.max_side)
        skip = check_layers(r.skip_guidance_layers)
        if any(not 0 <= i < mcfg.depth for i in skip):
            raise InputError(f"skip_guidance_layers must be block indices below {mcfg.depth}, got {list(skip)}")
        control = check_control(self, r, "sd3")
        control.check_size(height, width)
        with timer.stage("encode_prompt"):
            text = self.prepare_text(r, do_cfg)
        (ctx, pooled), both = text.cond, text.batch()  # both: [uncond ; cond] with CFG
        n, f = ctx.shape[0], self.vae.downscale
        sigmas = sd3_schedule(steps, mcfg.shift) if r.sigmas is None else self.given_sigmas(r.sigmas, steps)
        given = None if r.sigmas is None else [round(float(v), 6) for v in sigmas[:-1]]
        if r.image is not None:
            with timer.stage("encode_image"):
                if r.mask_image is None:
                    x, sigmas, seeds = self.image_start(r, n, height, width, sigmas)
                else:
                    x, sigmas, seeds, inpaint = masks.flow_start(self, r, n, height, width, sigmas)
        else:
            shape = (self.vae.config.z_channels, height // f, width // f)
            x, seeds = self.initial_noise(n, shape, r.seed, r.generator, r.latents)
        if control.nets:
            with timer.stage("encode_image"):
                control.prepare(self, n, height, width, latents=True)
        start, stop = r.skip_layer_guidance_start, r.skip_layer_guidance_stop
        slg_scale = check_scale(r.skip_layer_guidance_scale, "skip_layer_guidance_scale")

        def velocity(x, step):
            t = torch.full((n,), float(step) * 1000.0, device=self.device)
            if not do_cfg:
                return self.predict(
                    step.with_branch("cond"), x, t, ctx, pooled, **control.residuals(step, x, t, ctx, pooled)
                )
            x2, t2 = torch.cat((x, x)), torch.cat((t, t))
            uncond, cond = self.predict(
                step.with_branch("cfg"), x2, t2, *both, **control.residuals(step, x2, t2, *both)
            ).chunk(2)
            v = cfg_combine(cond, uncond, guidance)
            if skip and slg_active(step.index, step.steps, start, stop):
                v_skip = self.predict(step.with_branch("slg"), x, t, ctx, pooled, skip_layers=skip)
                v = skip_layer_guidance(v, cond, v_skip, slg_scale)
            return v

        settings = self.base_settings(height, width, steps, guidance, sampler)
        settings["skip_guidance_layers"] = list(skip) or None
        settings["sigmas"] = given
        if control.nets:
            settings["controlnet"] = control.settings()
        if r.image is not None:
            settings["strength"] = r.strength
        # the (t, pooled) batches the velocity function runs: CFG's doubled batch, or the
        # conditional one alone; skip-layer guidance adds conditional-only forwards
        batches = [(2 * n, both[1])] if do_cfg else [(n, pooled)]
        if do_cfg and skip:
            batches.append((n, pooled))
        conditioning = self._conditioning_table(
            lambda s: [
                self.transformer.conditioning(torch.full((b,), s * 1000.0, device=self.device), y) for b, y in batches
            ],  # fmt: skip
            sigmas,
        )
        plan = Plan(x, sigmas, sampler, velocity, seeds, settings, conditioning=conditioning)
        return masks.attach(plan, inpaint, r)
