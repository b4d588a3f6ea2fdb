"""FLUX.1 text-to-image (dev, schnell) and Kontext image editing."""

from __future__ import annotations

import warnings

import torch

from ..errors import InputError, MissingComponentError, check_scale
from ..models.flux import make_img_ids, pack_latents, unpack_latents
from ..samplers import cfg as cfg_combine
from ..samplers import flux_schedule
from . import control_image, masks
from . import flux_conditioning as conditioned
from .arguments import CACHE, CONTROLNET, INPAINT, NEGATIVE_EMBEDS, PROMPTS, STANDARD, STEP_END, arg, call_arguments
from .base import BasePipeline
from .control import check_control
from .images import kontext_size, load_image, to_tensor
from .outputs import PipelineOutput
from .prompts import as_prompt_list, check_embeds
from .settings import resolve_size
from .template import Plan


class FluxPipeline(BasePipeline):
    """prompt -> images with a FLUX.1 transformer, the 16-channel VAE and CLIP-L + T5.

    ``text_encoder`` may be None when every call passes ``prompt_embeds`` and ``pooled_prompt_embeds``.
    Sampling defaults come from the model config (``config.sampling``).
    """

    def __init__(self, transformer, vae, text_encoder=None, default_size=None, max_side: int | None = None):
        super().__init__(transformer, vae, text_encoder, default_size)
        # 4x the trained side: 4096 px for FLUX.1 (1024 px), 64 px for the 16 px embedded model
        self.max_side = max_side or 4 * max(self.default_size)
        self._last_image = None

    @property
    def weights_device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    @property
    def multiple(self) -> int:
        return 2 * self.vae.downscale  # VAE downscale x 2x2 packing (16 for the real VAE)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None:
            raise MissingComponentError(
                "this pipeline has no text encoders: pass prompt_embeds and "
                "pooled_prompt_embeds, or load the model with its text encoders"
            )
        return self.encode_text(prompts)

    def pooled_embeds(self, prompt, embeds, pooled, what: str):
        """(txt, y): the given pair, or CLIP-L + T5's for ``prompt``; FLUX's messages name the
        diffusers arguments."""
        if embeds is None:
            return self.encode_prompt(as_prompt_list(prompt, what))
        if pooled is None:
            raise InputError(f"{what}_embeds needs {what.replace('prompt', 'pooled_prompt')}_embeds too")
        check_embeds(embeds, pooled, what)
        return embeds, pooled

    def _context_image(self, image, auto_resize: bool):
        """Kontext: the input image, resized, VAE-encoded (mean), packed; its ids have index 1."""
        if not self.config.kontext:
            raise InputError(f"{self.config.name} does not take an input image; load a Kontext model for editing")
        pil = load_image(image)
        if auto_resize:
            width, height = kontext_size(*pil.size, self.multiple)
        else:
            width, height = (s // self.multiple * self.multiple for s in pil.size)
        pixels = to_tensor(pil, width, height).to(self.device)
        with torch.no_grad(), self.stage("vae"):
            latent = self.vae.encode(pixels).float()  # [1, 16, h, w]
        tokens = pack_latents(latent)
        ids = make_img_ids(latent.shape[-2] // 2, latent.shape[-1] // 2, index=1, device=self.device)
        return tokens, ids, (height, width)

    @call_arguments(*PROMPTS, "image", *STANDARD, "latents", arg("auto_resize", "bool", True), "progress",
                    *CACHE, "sigmas", arg("true_cfg_scale", "float | None"), "strength", *NEGATIVE_EMBEDS,
                    *STEP_END, *INPAINT, *CONTROLNET, "control_mode")  # fmt: skip
    def __call__(self, **request) -> PipelineOutput:
        """Generate images. ``image``: for Kontext the image to edit, the output size defaulting to
        its (resized) size; for dev / schnell the start of image-to-image, noised to the sigma
        ``strength`` (default 0.6) selects, as diffusers' FluxImg2ImgPipeline (output size: the
        image's, rounded down to a multiple of 16, unless height / width are given).
        ``latents``: initial noise [B, 16, h, w] instead of seeded noise.
        ``true_cfg_scale`` > 1: classifier-free guidance against ``negative_prompt`` (default "")
        as diffusers' option of the same name; off by default except for models trained for it.
        ``mask_image`` (with ``image``; dev / schnell): inpainting as diffusers' FluxInpaintPipeline,
        white pixels repainted, ``strength`` (default 0.6) and ``padding_mask_crop`` as there.
        FLUX.1 Fill: ``image`` and ``mask_image`` (white: repaint; strength default 1.0), as
        diffusers' FluxFillPipeline; FLUX.1 Canny / Depth: ``control_image`` (the output size
        defaulting to its), as FluxControlPipeline (:mod:`.flux_conditioning`). With ControlNets
        (fastflow.load(..., controlnet=)): ``control_image`` (one per net), ``control_mode`` (union
        nets) & co., as FluxControlNetPipeline (pipelines/control.py); with ``image`` (and
        ``mask_image``) as FluxControlNetImg2ImgPipeline / FluxControlNetInpaintPipeline."""
        return masks.generate(self, request)

    def _guidance(self, guidance_scale, true_cfg_scale, negative_prompt) -> tuple[float | None, float]:
        """(distilled guidance or None, true-CFG scale) with the references' warnings."""
        true_cfg = check_scale(
            self.defaults.get("true_cfg", 1.0) if true_cfg_scale is None else true_cfg_scale, "true_cfg_scale"
        )
        if negative_prompt is not None and true_cfg <= 1.0:
            warnings.warn(
                "negative_prompt needs true_cfg_scale > 1 (FLUX.1 is guidance-distilled); ignored",
                UserWarning,
                stacklevel=4,
            )
        if self.config.guidance_embed:
            guidance = self.defaults["guidance"] if guidance_scale is None else guidance_scale
            return check_scale(guidance, "guidance_scale"), true_cfg
        if guidance_scale not in (None, 0, 0.0):
            warnings.warn(
                f"{self.config.name} has no guidance embedding; guidance_scale={guidance_scale} is ignored",
                UserWarning,
                stacklevel=4,
            )
        return None, true_cfg

    def prepare(self, timer, r) -> Plan:
        steps, sampler = self.sampling(r.num_inference_steps, r.sampler, r.sigmas)
        guidance, true_cfg = self._guidance(r.guidance_scale, r.true_cfg_scale, r.negative_prompt)
        control = check_control(self, r, "flux")  # ControlNets (pipelines/control.py)
        if not control.nets:
            conditioned.check_request(self, r)  # FLUX.1 Fill / Canny / Depth inputs
        cond_tokens = cond_ids = extra = None
        default_size = self.default_size
        img2img = r.image is not None and not self.config.kontext
        if r.mask_image is not None and self.config.kontext:
            raise InputError(f"{self.config.name} (Kontext) does not inpaint: load FLUX.1 dev / schnell")
        if self.config.conditioning is None:  # Fill reads its mask in conditioned.check_request
            masks.check_request(r, "FLUX")
        inpaint = None
        if r.strength is not None and not img2img:
            raise InputError(
                "strength needs an input image (image=)"
                if r.image is None
                else f"{self.config.name} reads image= as the image to edit (Kontext); strength does not apply"
            )
        if img2img:
            default_size = self.image_size(r)
        elif r.image is not None:
            with timer.stage("encode_image"):
                cond_tokens, cond_ids, default_size = self._context_image(r.image, r.auto_resize)
        elif r.control_image is not None and not control.nets:
            default_size = conditioned.control_size(self, r)
        height, width = resolve_size(r.height, r.width, default_size, self.multiple, self.max_side)
        control.check_size(height, width)  # tensor control images must have the output's size
        with timer.stage("encode_prompt"):
            text = self.prepare_text(r, true_cfg > 1.0, uncond_first=False)  # [cond ; uncond] with true CFG
        (txt, y), n = text.batch(), text.images
        f = self.vae.downscale
        h_lat, w_lat = height // f, width // f
        tokens = (h_lat // 2) * (w_lat // 2)
        # mu from the target tokens only (Kontext context tokens excluded, as both references do)
        if r.sigmas is not None:
            sigmas = self.given_sigmas(r.sigmas, steps)
        else:
            sigmas = flux_schedule(steps, tokens, shift=self.config.shift_schedule)
        given = None if r.sigmas is None else [round(float(v), 6) for v in sigmas[:-1]]
        if img2img:
            with timer.stage("encode_image"):
                if self.config.conditioning:  # FLUX.1 Fill: masked-image latents and the mask
                    fill_seeds = conditioned.fill_generators(r, n)
                    noise, sigmas, seeds = self.image_start(r, n, height, width, sigmas)
                    extra, seeds = conditioned.fill_condition(self, r, n, height, width), fill_seeds or seeds
                elif control.nets:  # ControlNet img2img / inpainting (pipelines/control_image.py)
                    noise, sigmas, seeds, inpaint = control_image.flux_start(self, control, r, n, height, width, sigmas)
                elif r.mask_image is None:
                    noise, sigmas, seeds = self.image_start(r, n, height, width, sigmas)
                else:  # inpainting (dev / schnell)
                    noise, sigmas, seeds, inpaint = masks.flow_start(self, r, n, height, width, sigmas, pack_latents)
        elif r.control_image is not None and not control.nets:
            with timer.stage("encode_image"):
                shape = (self.vae.config.z_channels, h_lat, w_lat)
                noise, seeds, extra = conditioned.control_start(self, r, n, height, width, shape)
        else:
            shape = (self.vae.config.z_channels, h_lat, w_lat)
            if control.nets:
                with timer.stage("encode_image"):
                    noise, seeds = control.flux_start(self, r, n, height, width, shape)
            else:
                noise, seeds = self.initial_noise(n, shape, r.seed, r.generator, r.latents)
        x = pack_latents(noise)  # [B, N, 64], fp32 state
        img_ids = make_img_ids(h_lat // 2, w_lat // 2, device=self.device)
        txt_ids = torch.zeros(txt.shape[1], 3, device=self.device)
        batch = 2 * n if true_cfg > 1.0 else n
        g = None if guidance is None else torch.full((batch,), float(guidance), device=self.device)
        if cond_tokens is not None:
            cond_tokens = cond_tokens.expand(batch, -1, -1)

        def velocity(x, step):
            t = torch.full((batch,), float(step), device=self.device)
            step = step.with_branch("cfg" if true_cfg > 1.0 else "cond")
            xs = conditioned.with_condition(torch.cat((x, x)) if true_cfg > 1.0 else x, extra)
            nets = control.flux_residuals(step, xs, txt, y, t, img_ids, txt_ids, g) if control.nets else {}
            v = self.predict(
                step, xs, txt, y, t, img_ids, txt_ids, g, img_cond=cond_tokens, img_cond_ids=cond_ids, **nets
            )
            return cfg_combine(*v.chunk(2), true_cfg) if true_cfg > 1.0 else v

        settings = self.base_settings(height, width, steps, guidance, sampler)
        settings.update(edit=r.image is not None, true_cfg_scale=true_cfg if true_cfg > 1.0 else None)
        if img2img:
            settings["strength"] = r.strength
        settings["sigmas"] = given
        if control.nets:
            settings["controlnet"] = {**control.settings(), "mode": control.modes}
        conditioning = self._conditioning(sigmas, batch, y, g)
        plan = Plan(
            x, sigmas, sampler, velocity, seeds, settings, lambda x: unpack_latents(x, h_lat, w_lat), conditioning
        )
        return masks.attach(plan, inpaint, r)

    def _conditioning(self, sigmas, batch: int, y, g) -> torch.Tensor | None:
        """vec of every timestep the loop can ask for (each sigma), computed exactly as the forward
        computes it (same batch, same call), for the modulation precompute."""
        return self._conditioning_table(
            lambda s: [self.transformer.conditioning(torch.full((batch,), s, device=self.device), y, g)], sigmas
        )

    def on_images(self, images, output_type: str) -> None:
        if output_type == "pil":
            self._last_image = images[-1]

    def edit(self, prompt, image=None, **kwargs) -> PipelineOutput:
        """Kontext multi-turn editing: edit ``image``, or the last image this pipeline made."""
        image = image if image is not None else self._last_image
        if image is None:
            raise InputError("edit() needs an image the first time (no previous output to edit)")
        kwargs.setdefault("output_type", "pil")
        if kwargs["output_type"] != "pil":
            raise InputError("edit() returns PIL images so that edits can be chained")
        return self(prompt, image=image, **kwargs)
