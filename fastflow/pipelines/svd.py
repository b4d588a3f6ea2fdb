"""Stable Video Diffusion (SVD, SVD-XT) image-to-video, as diffusers' StableVideoDiffusionPipeline
runs it, on the prepare -> denoise -> decode template.

``prepare`` checks the request (pipelines/svd_inputs.py), embeds the image with CLIP (the "text"
stage of model offload), draws the random numbers in diffusers' order (the noise augmentation of
the conditioning image [B, 3, H, W] first, then the start latents [B * videos, F, 4, h, w]: from one
generator, or row by row from a list), encodes the augmented image with the VAE (unscaled means,
repeated over the frames; zeros for the unconditional half) and builds the EDM plan: Karras sigmas,
the v-prediction preconditioning and Euler (samplers/edm.py), the UNet called once per step with the
unconditional and conditional halves in one batch when ``max_guidance_scale > 1``, combined with the
per-frame guidance ramp. The template's decode hook (``decode_latent``) decodes the frames
``decode_chunk_size`` latents at a time, with a progress bar over the chunks.

Differences from diffusers, on purpose: heights and widths must be multiples of 64 (the VAE's 8 times
the UNet's three halvings; diffusers asks for 8 and interpolates odd sizes in the UNet); with several
images and ``num_videos_per_prompt`` > 1 every video is conditioned on its own image through CLIP and
the VAE alike (diffusers repeats the VAE latents in another order than the CLIP embeddings, pairing a
video's CLIP embedding with another image's latent); RGBA images are composited over white (read as
every fastflow image); the arguments are bounded (svd_inputs.py).
"""

from __future__ import annotations

import collections
import random
import threading
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.configs import SamplingDefaults
from ..samplers.edm import edm_derivative, edm_init_noise_sigma, edm_schedule, guidance_enabled, guidance_ramp
from .arguments import DEEPCACHE, STEP_END, arg, call_arguments
from .base import BasePipeline
from .noise import check_generators, check_seeds
from .outputs import PipelineOutput
from .settings import MAX_IMAGES_PER_CALL
from .svd_inputs import check_size, check_video_request, format_video, read_images, vae_pixels
from .template import Plan
from .video_images import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, image_embeddings

# diffusers' StableVideoDiffusionPipeline defaults (its __call__ signature): 25 steps, guidance 1 -> 3
SVD_SAMPLING = SamplingDefaults(steps=25, guidance=3.0, sampler="euler", size=(576, 1024))

SVD_ARGUMENTS = (
    arg("image"),
    "height",
    "width",
    arg("num_frames", "int | None"),
    arg("num_inference_steps", "int", 25),
    arg("min_guidance_scale", "float", 1.0),
    arg("max_guidance_scale", "float", 3.0),
    arg("fps", "int", 7),
    arg("motion_bucket_id", "int", 127),
    arg("noise_aug_strength", "float", 0.02),
    arg("decode_chunk_size", "int | None"),
    arg("num_videos_per_prompt", "int", 1),
    "seed",
    "generator",
    "latents",
    "output_type",
    "callback",
    "progress",
    "cache",  # "deepcache" (with cache_interval / cache_branch) or a fastflow.caching.DeepCache
    *DEEPCACHE,
    *STEP_END,
)


@dataclass
class VideoPipelineOutput(PipelineOutput):
    """A video generation's result: ``frames`` in diffusers' layout per ``output_type`` ("pil": a
    list per video of PIL images; "np" [B, F, H, W, 3]; "pt" [B, F, 3, H, W], both in [0, 1];
    "latent" [B, F, 4, h, w]), the seed of each video (None with a generator), the settings used,
    stage timings. ``images`` is the same object (the template's name)."""

    @property
    def frames(self):
        return self.images

    def __getitem__(self, key):
        return self.images if key == "frames" else super().__getitem__(key)


class SVDPipeline(BasePipeline):
    """image -> video with SVD's spatio-temporal UNet, temporal-decoder VAE and CLIP image encoder
    (built from loading's ``SVDComponents``: :meth:`from_components`)."""

    def __init__(self, unet, vae, image_encoder, config=None, image_mean=CLIP_IMAGE_MEAN, image_std=CLIP_IMAGE_STD,
                 scheduler: dict | None = None):  # fmt: skip
        # BasePipeline's state, with SVD's defaults (its UNet config has no text-model sampling defaults)
        self.transformer, self.vae, self.text_encoder = unet, vae, None
        self.image_encoder = image_encoder
        self.config = unet.config if config is None else config
        self.defaults = SVD_SAMPLING.as_dict()
        self.default_size = tuple(SVD_SAMPLING.size)
        self.view_upscale = 1
        self._running: set[threading.Event] = set()
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()
        self._prompt_lock = threading.Lock()
        self.max_images_per_call = MAX_IMAGES_PER_CALL
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.scheduler = dict(scheduler or {})
        self._check_scheduler()

    @classmethod
    def from_components(cls, parts) -> SVDPipeline:
        """The pipeline of loading's ``SVDComponents`` (fastflow.loading.svd.load_svd)."""
        return cls(parts.unet, parts.vae, parts.image_encoder, parts.config, parts.image_mean, parts.image_std,
                   getattr(parts, "scheduler", None))  # fmt: skip

    def _check_scheduler(self) -> None:
        """A scheduler config that would change the math (another prediction type, sigma range or
        spacing than SVD's) is refused: the sampler here is SVD's EDM Euler only."""
        want = {"prediction_type": "v_prediction", "sigma_min": 0.002, "sigma_max": 700.0,
                "use_karras_sigmas": True, "timestep_type": "continuous", "timestep_spacing": "leading"}  # fmt: skip
        bad = {k: v for k, v in self.scheduler.items() if k in want and v != want[k]}
        if bad:
            raise InputError(f"scheduler config {bad} differs from SVD's EDM schedule ({want}); fastflow runs "
                             "that one only")  # fmt: skip

    @property
    def unet(self):
        return self.transformer

    @property
    def weights_device(self) -> torch.device:
        return self.transformer.out[2].weight.device

    @property
    def multiple(self) -> int:
        """Heights and widths are multiples of this: the VAE's downscale times the UNet's halvings."""
        return self.vae.downscale * 2 ** (len(self.config.channel_mult) - 1)

    def load_lora(self, path, scale: float = 1.0, name: str | None = None, fuse: bool = False) -> str:
        raise InputError("LoRA is not supported for Stable Video Diffusion")

    def enable_parallelism(self, *args, **kwargs):
        raise InputError("parallelism is not supported for Stable Video Diffusion: run it in one process")

    def to(self, device=None, dtype: torch.dtype | None = None):
        """As the other pipelines' ``to``, the image encoder moving (and casting) with the UNet."""
        super().to(device, dtype)
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        self.image_encoder.to(device=None if device is None else self.weights_device, dtype=dtype)
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device="cuda"):
        """diffusers' order "image_encoder->unet->vae": the image encoder is the "text" stage."""
        super().enable_model_cpu_offload(gpu_id, device)
        self._offload.groups["text"] = [self.image_encoder]
        self._offload.move("text", self._offload.storage)
        return self

    @call_arguments(*SVD_ARGUMENTS)
    def __call__(self, **request) -> VideoPipelineOutput:
        """Generate ``num_videos_per_prompt`` clips of ``num_frames`` frames (default: the model's, 14
        for SVD, 25 for SVD-XT) per image, as diffusers' StableVideoDiffusionPipeline: ``image`` a PIL
        image (or path / uint8 array), a list of them, or a [B, 3, H, W] tensor in [0, 1]; guidance
        rises per frame from ``min_guidance_scale`` to ``max_guidance_scale`` and runs only when
        ``max_guidance_scale > 1``; the model sees ``fps - 1``, ``motion_bucket_id`` and
        ``noise_aug_strength``; frames are decoded ``decode_chunk_size`` at a time (default: all
        the frames of a clip). ``seed``: one per video (seed, seed + 1, ...), each video's generator
        ``manual_seed(seed_i)`` as if passed as a list of generators. Returns a
        :class:`VideoPipelineOutput` (``.frames``)."""
        out = self.generate(**request)
        if isinstance(out, tuple):
            return out
        return VideoPipelineOutput(out.images, out.seeds, out.settings, out.timings, out.stats)

    # -- the template's hooks -------------------------------------------------------------------

    def _generators(self, r, n: int):
        """(generator or list, seeds): the caller's, or one ``manual_seed(seed_i)`` per video."""
        if r.generator is not None:
            return check_generators(r.generator, n), [None] * n
        seeds = check_seeds(r.seed, n) or [random.randrange(2**63) for _ in range(n)]
        return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds

    @staticmethod
    def _randn(shape, generator, dtype) -> torch.Tensor:
        """diffusers' randn_tensor: one draw of ``shape`` from a generator, or one row of shape
        (1, ...) from each of the first shape[0] generators of a list, each on its generator's
        device; returned on the CPU."""
        if isinstance(generator, list):
            rows = [
                torch.randn((1, *shape[1:]), generator=g, dtype=dtype, device=g.device) for g in generator[: shape[0]]
            ]
            return torch.cat([row.cpu() for row in rows])
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).cpu()

    def prepare(self, timer, r) -> Plan:
        check_video_request(r, self.config.num_frames)
        height, width = check_size(r.height, r.width, self.default_size, self.multiple)
        guided = guidance_enabled(r.min_guidance_scale, r.max_guidance_scale)
        steps = r.num_inference_steps
        sigmas, timesteps = edm_schedule(steps)  # checks the step count
        images, batch = read_images(r.image)
        frames, per_image = r.num_frames, r.num_videos_per_prompt
        n = batch * per_image
        if n > self.max_images_per_call:
            raise InputError(f"{n} videos in one call exceeds max_images_per_call={self.max_images_per_call}")
        f = self.vae.downscale
        shape = (n, frames, self.vae.config.z_channels, height // f, width // f)
        if r.latents is not None and tuple(r.latents.shape) != shape:
            raise InputError(f"latents must be {list(shape)}, got {list(r.latents.shape)}")
        gens, seeds = self._generators(r, n)
        device, dtype = self.device, self.transformer.dtype
        with timer.stage("encode_image"), self.stage("text"):
            context = image_embeddings(self.image_encoder, images, per_image, guided, self.image_mean, self.image_std)
        context = context.to(device)
        pixels = vae_pixels(images, height, width)
        aug = self._randn(tuple(pixels.shape), gens, torch.float32)  # the first draw (diffusers' order)
        pixels = (pixels + r.noise_aug_strength * aug).to(device)
        with timer.stage("encode_image"), self.stage("vae"):
            cond = self.vae.encode(pixels).to(context.dtype).repeat_interleave(per_image, dim=0)
        if guided:
            cond = torch.cat((torch.zeros_like(cond), cond))
        cond = cond.unsqueeze(1).repeat(1, frames, 1, 1, 1)  # [2n | n, F, 4, h, w]
        # the second draw, in the model's dtype; given latents are unit noise too (diffusers scales both)
        noise = self._randn(shape, gens, context.dtype) if r.latents is None else r.latents.cpu()
        noise = (noise * edm_init_noise_sigma(sigmas)).float()
        ids = torch.tensor([[r.fps - 1, r.motion_bucket_id, r.noise_aug_strength]], dtype=context.dtype)
        ids = ids.repeat(len(cond), 1).to(device)
        ramp = guidance_ramp(r.min_guidance_scale, r.max_guidance_scale, frames, n, torch.float32, device)
        timesteps = timesteps.to(device)

        def predict_v(x_in, step):  # the (guided) v of the c_in-scaled state
            x = torch.cat((x_in, x_in)) if guided else x_in
            x = torch.cat((x.to(dtype), cond.to(dtype)), dim=2)  # noise channels first, then the image latent
            t = timesteps[step.index]
            v = self.predict(step.with_branch("cfg" if guided else "cond"), x, t, context, ids)
            if not guided:
                return v
            uncond, cond_v = v.chunk(2)
            return uncond + ramp.to(v.dtype) * (cond_v - uncond)

        settings = {
            "model": self.config.name,
            "height": height,
            "width": width,
            "num_frames": frames,
            "num_inference_steps": steps,
            "min_guidance_scale": float(r.min_guidance_scale),
            "max_guidance_scale": float(r.max_guidance_scale),
            "guidance": guided,
            "fps": r.fps,
            "motion_bucket_id": r.motion_bucket_id,
            "noise_aug_strength": r.noise_aug_strength,
            "decode_chunk_size": r.decode_chunk_size,
            "num_videos_per_prompt": per_image,
            "sampler": "euler (EDM, Karras sigmas, v-prediction)",
            "dtype": str(dtype).removeprefix("torch."),
        }
        plan = Plan(noise.to(device), sigmas, "euler", edm_derivative(predict_v), seeds, settings,
                    timesteps=timesteps)  # fmt: skip
        plan.video = (frames, r.decode_chunk_size)
        return plan

    def decode_latent(self, latent: torch.Tensor, plan: Plan, progress: bool) -> torch.Tensor:
        """Clips [B, 3, F, H, W] of the final latents [B, F, 4, h, w], ``decode_chunk_size`` frames
        at a time (diffusers' ``decode_latents``), with a progress bar over the chunks."""
        from tqdm.auto import tqdm

        frames, chunk = plan.video
        total = latent.shape[0] * frames
        with tqdm(total=total, disable=not progress, desc="decoding", unit="frame", leave=False) as bar:
            return self.vae.decode_chunks(latent, frames, chunk, lambda done, _: bar.update(done - bar.n))

    format_images = staticmethod(format_video)
