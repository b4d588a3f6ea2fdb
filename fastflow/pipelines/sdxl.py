"""SDXL and SDXL-Turbo text-to-image: a discrete-time epsilon UNet, the 4-channel VAE and
CLIP-L + OpenCLIP-G, sampled as diffusers' StableDiffusionXLPipeline does (REFERENCE.md, SDXL)."""

from __future__ import annotations

import random

import torch

from ..errors import InputError, check_scale
from ..samplers import cfg as cfg_combine
from ..samplers.discrete import discrete_schedule, dpm_schedule, euler_ancestral, init_noise_sigma, model_input_scale
from . import control_image, masks
from .arguments import (
    CACHE,
    CONTROLNET,
    DEEPCACHE,
    INPAINT,
    NEGATIVE_EMBEDS,
    PROMPTS,
    STANDARD,
    STEP_END,
    arg,
    call_arguments,
)
from .base import BasePipeline
from .control import check_control, controlnets_of
from .noise import check_seeds
from .outputs import PipelineOutput
from .settings import resolve_size
from .template import Plan

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")
MAX_SIDE = 4096  # no position table limits a UNet; 4x SDXL's trained side
SIZE = "tuple[int, int] | None"
MICRO_CONDITIONING = (  # SDXL's __call__ arguments beyond the common ones (diffusers' names and defaults)
    arg("original_size", SIZE),
    arg("crops_coords_top_left", "tuple[int, int]", (0, 0)),
    arg("target_size", SIZE),
    arg("negative_original_size", SIZE),
    arg("negative_crops_coords_top_left", SIZE),
    arg("negative_target_size", SIZE),
)


def _size_pair(value, name: str, default: tuple[int, int]) -> tuple[int, int]:
    value = default if value is None else value
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise InputError(f"{name} must be a pair of integers >= 0 (height, width) / (top, left), got {value!r}")
    return int(value[0]), int(value[1])


class SDXLPipeline(BasePipeline):
    """prompt -> images with the SDXL UNet (base or Turbo). Defaults come from the model config:
    base: Euler, "leading" spacing, 30 steps, CFG 5, 1024x1024; Turbo: Euler ancestral, "trailing"
    spacing, 1 step, no CFG, 512x512. ``timestep_spacing`` and ``force_zeros_for_empty_prompt``
    (diffusers' SDXL setting: with CFG and no negative prompt the unconditional embeddings are
    zeros) are attributes a caller may change."""

    force_zeros_for_empty_prompt = True

    def __init__(self, transformer, vae, text_encoder=None, default_size=None):
        super().__init__(transformer, vae, text_encoder, default_size)
        self.timestep_spacing = self.config.spacing

    def load_lora(
        self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False, unet_only: bool = False
    ) -> str:
        """Load an SDXL LoRA file onto the UNet (diffusers / PEFT, kohya in the official or the
        diffusers layout; docs/lora.md) and return its name; ``scale``, ``fuse``, several adapters,
        ``set_lora_scales``, ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora`` as for FLUX. A file
        with text-encoder keys is refused unless ``unet_only=True`` (its UNet part alone applied,
        the text-encoder keys listed in a warning); LoCon, LoHa, LoKr and DoRA files are refused."""
        if not isinstance(unet_only, bool):
            raise InputError(f"load_lora unet_only= must be True or False, got {unet_only!r}")
        return self._load_lora(path, scale, name, fuse, text_encoder="warn" if unet_only else "refuse")

    @property
    def unet(self):
        return self.transformer

    @property
    def weights_device(self) -> torch.device:
        return self.transformer.out[2].weight.device

    @property
    def multiple(self) -> int:
        return self.vae.downscale * self.transformer.downscale

    @call_arguments(*PROMPTS, *STANDARD, *NEGATIVE_EMBEDS, "latents", *MICRO_CONDITIONING, "progress", *STEP_END,
                    "image", "strength", "sigmas", *CACHE, *DEEPCACHE, *INPAINT, *CONTROLNET)  # fmt: skip
    def __call__(self, **request) -> PipelineOutput:
        """Generate images; CFG runs when guidance_scale > 1 (uncond and cond in one batch).
        ``sampler``: "euler", "euler_ancestral" (fresh noise each step, from each image's own
        generator) or "dpmpp_2m". ``original_size`` / ``crops_coords_top_left`` / ``target_size``
        (and their ``negative_`` twins) are SDXL's micro-conditioning, defaulting to the output size
        and (0, 0) as in diffusers. ``mask_image`` (with ``image``): inpainting as diffusers'
        StableDiffusionXLInpaintPipeline (``strength`` default 0.9999, ``padding_mask_crop``), with a
        4-channel UNet (the known region blended every step) or an inpainting UNet (9 channels).
        ``control_image`` & co.: ControlNets (pipelines/control.py, as diffusers'
        StableDiffusionXLControlNetPipeline; the output size defaults to the control image's), with
        ``image`` alone: image-to-image as StableDiffusionXLImg2ImgPipeline (strength default 0.3;
        euler / euler_ancestral); with ControlNets,
        ``image`` (and ``mask_image``) as StableDiffusionXLControlNetImg2ImgPipeline (strength default
        0.8) / StableDiffusionXLControlNetInpaintPipeline (pipelines/control_image.py)."""
        return masks.generate(self, request)

    def _time_ids(self, r, height: int, width: int, n: int, negative: bool) -> torch.Tensor:
        """[n, 6]: (original h, w, crop top, left, target h, w), diffusers' defaults."""
        size = (height, width)
        original = _size_pair(r.original_size, "original_size", size)
        crop = _size_pair(r.crops_coords_top_left, "crops_coords_top_left", (0, 0))
        target = _size_pair(r.target_size, "target_size", size)
        if negative:
            original = _size_pair(r.negative_original_size, "negative_original_size", original)
            crop = _size_pair(r.negative_crops_coords_top_left, "negative_crops_coords_top_left", crop)
            target = _size_pair(r.negative_target_size, "negative_target_size", target)
        ids = torch.tensor([[*original, *crop, *target]], dtype=torch.float32)
        return ids.expand(n, 6).to(self.device)

    @staticmethod
    def _generators(r, n: int):
        """The generator(s) of the start noise and the ancestral sampler's noise: the given one
        (serving the whole batch, as in diffusers) or list, else ``manual_seed(seed_i)`` per image,
        so that an image depends on its seed alone."""
        if r.generator is not None:
            return r.generator, [None] * n
        seeds = check_seeds(r.seed, n) or [random.randrange(2**63) for _ in range(n)]
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds

    def prepare(self, timer, r) -> Plan:
        cfg = self.config
        z = self.vae.config.z_channels
        plain_img2img = r.mask_image is None and r.image is not None and not controlnets_of(self)
        if r.image is None and r.strength is not None:
            raise InputError("strength needs an input image (image=)")
        if r.mask_image is None and cfg.in_channels != z:
            raise InputError(
                f"this UNet takes {cfg.in_channels} channels (an inpainting UNet): pass image= and mask_image="
            )
        if cfg.in_channels not in (z, 2 * z + 1):
            raise InputError(f"SDXL UNets take {z} or {2 * z + 1} (inpainting) channels, this one {cfg.in_channels}")
        masks.check_request(r, "SDXL")
        inpaint = None
        if r.sigmas is not None:
            raise InputError("sigmas= is not supported for SDXL: choose num_inference_steps and the sampler")
        steps, sampler = self.sampling(r.num_inference_steps, r.sampler)
        if sampler not in SAMPLERS:
            raise InputError(f"sampler {sampler!r} is not one of SDXL's: {', '.join(SAMPLERS)}")
        guidance = check_scale(
            self.defaults["guidance"] if r.guidance_scale is None else r.guidance_scale, "guidance_scale"
        )
        do_cfg = guidance > 1.0
        if r.mask_image is not None:
            r.strength = 0.9999 if r.strength is None else r.strength  # diffusers' SDXL inpaint default
            if sampler == "dpmpp_2m":
                raise InputError("SDXL inpainting runs the euler or euler_ancestral sampler, not dpmpp_2m")
        if plain_img2img:  # StableDiffusionXLImg2ImgPipeline: strength 0.3 by default (diffusers')
            control_image.check_sdxl_image(r, sampler, default_strength=0.3)
        control = check_control(self, r, "sdxl")
        control_image.check_sdxl(control, r, sampler)  # ControlNets with img2img / inpainting (control_image.py)
        default_size = self.image_size(r) if r.image is not None else control.size or self.default_size
        height, width = resolve_size(r.height, r.width, default_size, self.multiple, MAX_SIDE)
        control.check_size(height, width)
        with timer.stage("encode_prompt"):
            text = self.prepare_text(r, do_cfg, zeros_for_empty_negative=self.force_zeros_for_empty_prompt)
        ctx, pooled = text.cond
        n, f = ctx.shape[0], self.vae.downscale
        if pooled.shape[-1] != cfg.pooled_dim or ctx.shape[-1] != cfg.context_dim:
            raise InputError(
                f"text embeddings [{ctx.shape[-1]}] / pooled [{pooled.shape[-1]}] do not fit this UNet "
                f"(context {cfg.context_dim}, pooled {cfg.pooled_dim})"
            )
        ids = self._time_ids(r, height, width, n, negative=False)
        control_image.crop_sdxl(control, r, height, width)
        control.prepare(self, n, height, width, latents=False)
        spacing = self.timestep_spacing
        if sampler == "dpmpp_2m":
            sigmas, timesteps = dpm_schedule(steps, spacing)
            start = model_input_scale(float(sigmas[0]))  # diffusers' DPM state is alpha-scaled (std 1)
        else:
            sigmas, timesteps = discrete_schedule(steps, spacing)
            start = init_noise_sigma(sigmas, spacing)
        gens, seeds = self._generators(r, n)
        shape = (self.vae.config.z_channels, height // f, width // f)
        if r.image is None:
            noise, _ = self.initial_noise(n, shape, None, gens, r.latents)  # checks a generator list's length
            noise = noise * start
        elif r.mask_image is None:  # image-to-image (with or without ControlNets)
            r.generator, r.seed = gens, seeds
            noise, sigmas, timesteps = control_image.sdxl_image_start(self, r, n, height, width, sigmas, timesteps)
        else:
            r.generator, r.seed = gens, seeds
            noise, sigmas, timesteps, _, inpaint = masks.sdxl_start(self, r, n, height, width, sigmas, timesteps, start)
        timesteps = timesteps.float().to(self.device)
        if do_cfg:
            both = (*text.batch(), torch.cat((self._time_ids(r, height, width, n, negative=True), ids)))

        def velocity(x, step):  # the predicted noise eps = dx / dsigma
            t = timesteps[step.index].expand(n)
            x_in = x_net = x / model_input_scale(step.sigma)  # ControlNets see the latent channels only
            if inpaint is not None and inpaint.masked is not None:  # an inpainting UNet's extra channels
                x_in = torch.cat((x_in, inpaint.masked), 1)
            if not do_cfg:
                return self.predict(step.with_branch("cond"), x_in, t, ctx, pooled, ids,
                                    **control.residuals(step, x_net, t, ctx, pooled, ids))  # fmt: skip
            x2, t2 = torch.cat((x_in, x_in)), torch.cat((t, t))
            nets = control.residuals(step, torch.cat((x_net, x_net)), t2, *both) if control.nets else {}
            uncond, cond = self.predict(step.with_branch("cfg"), x2, t2, *both, **nets).chunk(2)
            return cfg_combine(cond, uncond, guidance)

        solver = None
        if sampler == "euler_ancestral":

            def noise_of(i, shape):  # step i's fresh noise, drawn after the model call (diffusers' order)
                if isinstance(gens, torch.Generator):
                    return torch.randn(shape, generator=gens)
                return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])

            def solver(velocity, x, sigmas, callback=None):
                return euler_ancestral(velocity, x, sigmas, noise_of, callback)

        settings = self.base_settings(height, width, steps, guidance, sampler)
        settings["timestep_spacing"] = spacing
        settings["original_size"] = list(ids[0, :2].int().tolist())
        settings["crops_coords_top_left"] = list(ids[0, 2:4].int().tolist())
        settings["target_size"] = list(ids[0, 4:].int().tolist())
        if control.nets:
            settings["controlnet"] = control.settings()
        if r.image is not None:
            settings["strength"] = r.strength
        plan = Plan(noise, sigmas, sampler, velocity, seeds, settings, solver=solver, timesteps=timesteps)
        return masks.attach(plan, inpaint, r)
