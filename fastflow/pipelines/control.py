"""ControlNets in the pipelines, as diffusers' StableDiffusionXLControlNetPipeline and
StableDiffusion3ControlNetPipeline, and FLUX's as FluxControlNetPipeline (with
``control_mode`` for union ControlNets): ``control_image`` (one per ControlNet), the per-net
``controlnet_conditioning_scale``, and the keep window ``control_guidance_start`` /
``control_guidance_end`` (a ControlNet counts at step i of n unless i / n < start or
(i + 1) / n > end). Every argument is checked before any work (:func:`check_control`); the
family's ``prepare`` then turns the images into the nets' inputs (:meth:`Control.prepare`) and
its velocity function asks :meth:`Control.residuals` for the keyword arguments of each forward
(none when no ControlNet counts at that step: a scale of 0 is exactly no ControlNet).

Control maps: SDXL ControlNets take the image in [0, 1] (diffusers' control image processor, no
normalisation); SD3 ControlNets its VAE latent (posterior mean, ``(mean - shift) * scale`` with no
shift where the config forces zeros for the pooled text, as diffusers). diffusers draws that
posterior sample from the global RNG, unseeded; fastflow takes its mean, so results repeat.
FLUX ControlNets take the packed VAE latent of the image resized to the output: a posterior sample
drawn from the call's generator(s) before the noise, one per ControlNet in order (diffusers' order);
with true CFG the nets run on the positive prompt and their residuals serve both branches
(diffusers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError, plain_number
from ..models.controlnet_flux import FluxControlNet
from ..models.controlnet_sd3 import MMDiTControlNet
from ..models.flux import pack_latents
from .images import load_image, to_tensor

CONTROL = ("control_image", "controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def controlnets_of(pipe) -> list:
    return list(getattr(pipe, "controlnets", None) or [])


def attach_controlnets(pipe, nets) -> None:
    """Give a pipeline its ControlNets (fastflow.load(..., controlnet=...) does)."""
    pipe.controlnets = list(nets)


def follow_base(pipe) -> None:
    """The nets to the base model's device and dtype (where ``pipe.to(...)`` or the offload left the
    transformer: with model CPU offload, CPU memory between stages; they move with the transformer
    in its stage)."""
    device, dtype = pipe.weights_device, pipe.transformer.dtype
    for net in controlnets_of(pipe):
        if net.dtype != dtype or next(net.parameters()).device != device:
            net.to(device=device, dtype=dtype)


def _number(value, name: str) -> float:
    value = plain_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number (or a list of them, one per ControlNet), got {value!r}")
    return float(value)


def _is_number(value, number: float) -> bool:
    """``value`` is the plain number ``number`` (an array, list or tensor never compares equal here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == number


def _per_net(value, name: str, count: int) -> list[float]:
    """One number for every ControlNet: a number is repeated, a list must have one per net."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InputError(f"{name} has {len(value)} values for {count} ControlNet(s): give one per ControlNet")
        return [_number(v, name) for v in value]
    return [_number(value, name)] * count


def _image(image, name: str):
    """A control image: a [1 or 3 channels..] tensor [C, H, W] / [1, C, H, W] in [0, 1], or what
    :func:`load_image` reads (path, PIL image, uint8 array)."""
    if isinstance(image, torch.Tensor):
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[0] != 1 or not t.is_floating_point():
            raise InputError(f"{name} as a tensor must be a float [3, H, W] or [1, 3, H, W] in [0, 1], got "
                             f"{list(image.shape)} {image.dtype}")  # fmt: skip
        return t.float().cpu()
    if isinstance(image, list):
        raise InputError(f"{name}: one image per ControlNet (a list only for several ControlNets)")
    return load_image(image)


def _size(image) -> tuple[int, int]:
    return (image.shape[-2], image.shape[-1]) if isinstance(image, torch.Tensor) else (image.height, image.width)


@dataclass
class Control:
    """The checked ControlNet request of one call; empty (no nets) when the pipeline has none."""

    nets: list = field(default_factory=list)
    images: list = field(default_factory=list)  # per net: a PIL image or a [1, C, H, W] tensor in [0, 1]
    scales: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    inputs: list = field(default_factory=list)  # per net: [n, C, h, w] ([n, N, 64] FLUX) after prepare
    modes: list = field(default_factory=list)  # per net: the union ControlNet's control mode, or None
    n: int = 1
    _batches: dict = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int] | None:
        """The first control image's (height, width): SDXL's default output size, as diffusers'."""
        return _size(self.images[0]) if self.nets else None

    def settings(self) -> dict | None:
        if not self.nets:
            return None
        return {"scale": self.scales, "guidance_start": self.starts, "guidance_end": self.ends}

    def check_size(self, height: int, width: int) -> None:
        """A tensor control image must have the output's size (PIL images are resized)."""
        for image in self.images:
            if isinstance(image, torch.Tensor) and _size(image) != (height, width):
                raise InputError(f"control_image is {_size(image)[0]}x{_size(image)[1]}; the output is "
                                 f"{height}x{width}: give a control image of the output size")  # fmt: skip

    def prepare(self, pipe, n: int, height: int, width: int, latents: bool) -> None:
        """The nets' inputs for ``n`` images of ``height`` x ``width``: the image in [0, 1] (SDXL) or
        its VAE latent (SD3, ``latents``); a tensor image must have that size already, PIL images are
        resized (LANCZOS) as diffusers' image processor does."""
        self.n = n
        for net, image in zip(self.nets, self.images, strict=True):
            self.check_size(height, width)
            if isinstance(image, torch.Tensor):
                unit = image
            else:
                if image.size != (width, height):
                    from PIL import Image

                    image = image.resize((width, height), resample=Image.LANCZOS)
                unit = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            if latents:
                pixels = to_tensor(image, width, height) if not isinstance(image, torch.Tensor) else unit * 2.0 - 1.0
                with pipe.stage("vae"):
                    mean = pipe.vae.posterior(pixels.to(pipe.device))[0]
                shift = 0.0 if net.config.force_zeros_for_pooled_projection else pipe.vae.config.shift_factor
                unit = (mean - shift) * pipe.vae.config.scale_factor
            self.inputs.append(unit.to(pipe.device, net.dtype).expand(n, -1, -1, -1))

    def flux_start(self, pipe, r, n: int, height: int, width: int, shape: tuple[int, ...]):
        """FLUX: (noise [n, *shape], seeds). Each net's control image, resized to the output, is
        VAE-encoded (a posterior sample from the call's generator(s)) and packed; then the noise is
        drawn from the same generator(s), as diffusers' FluxControlNetPipeline does."""
        from .flux_conditioning import _generators, _sample

        self.n = n
        self.check_size(height, width)
        gens = _generators(r, n)
        seeds = list(r.seed) if r.generator is None else [None] * n
        for net, image in zip(self.nets, self.images, strict=True):
            pixels = image * 2.0 - 1.0 if isinstance(image, torch.Tensor) else to_tensor(image, width, height)
            if getattr(net, "pixel_control", False):  # XLabs: the image itself (no latents drawn, as diffusers)
                self.inputs.append(pixels.to(pipe.device, net.dtype).expand(n, -1, -1, -1))
                continue
            latents = pack_latents(_sample(pipe, pixels, gens, n))
            self.inputs.append(latents.to(pipe.device, net.dtype).expand(n, -1, -1))
        noise, _ = pipe.initial_noise(n, shape, None, gens, r.latents)
        return noise, seeds

    def flux_residuals(self, step, x, txt, y, t, img_ids, txt_ids, guidance) -> dict:
        """FLUX: the transformer's ``controls`` / ``single_controls`` for one forward, summed over the
        nets that count at this step ({} when none does). The nets see the first ``n`` rows (the
        positive prompt under true CFG); their residuals are repeated over the batch's branches."""
        n, rows = self.n, x.shape[0]
        doubles = singles = None
        for index, (net, scale) in enumerate(zip(self.nets, self.scales_at(step), strict=True)):
            if scale == 0:
                continue
            g = guidance[:n] if guidance is not None and net.config.guidance_embed else None
            d, s = net(x[:n], txt[:n], y[:n], t[:n], img_ids, txt_ids, g, self.inputs[index], self.modes[index], scale)
            doubles = d if doubles is None else [p + q for p, q in zip(doubles, d, strict=True)]
            singles = s if singles is None else [p + q for p, q in zip(singles, s, strict=True)]
        if doubles is None:
            return {}
        if rows != n:
            doubles, singles = ([torch.cat([o] * (rows // n)) for o in outs] for outs in (doubles, singles))
        return {"controls": doubles or None, "single_controls": singles or None}

    def scales_at(self, step) -> list[float]:
        """Each net's scale at this step: scale x keep (diffusers' controlnet_keep)."""
        i, steps = step.index, step.steps
        keeps = [1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(self.starts, self.ends, strict=True)]
        return [c * k for c, k in zip(self.scales, keeps, strict=True)]

    def _input(self, index: int, rows: int) -> torch.Tensor:
        key = (index, rows)
        if key not in self._batches:  # CFG's batch: [image ; image], as diffusers' torch.cat([image] * 2)
            self._batches[key] = torch.cat([self.inputs[index]] * (rows // self.n))
        return self._batches[key]

    def residuals(self, step, x, t, *conditioning) -> dict:
        """The base model's keyword arguments for one forward on (x, t, *conditioning): SDXL's
        ``down_residuals`` / ``mid_residual``, the MMDiT's ``controls``; the sum over the nets that
        count at this step (nets at scale 0 are not run), {} when none does."""
        total = None
        for index, (net, scale) in enumerate(zip(self.nets, self.scales_at(step), strict=True)):
            if scale == 0:
                continue
            out = self._run(net, x, t, conditioning, self._input(index, x.shape[0]), scale)
            total = out if total is None else _add(total, out)
        if total is None:
            return {}
        if isinstance(total, tuple):
            return {"down_residuals": total[0], "mid_residual": total[1]}
        return {"controls": total}

    @staticmethod
    def _run(net, x, t, conditioning, control, scale):
        if isinstance(net, MMDiTControlNet):
            ctx, pooled = conditioning
            if net.config.force_zeros_for_pooled_projection:
                pooled = torch.zeros_like(pooled)
            return net(x, t, ctx, pooled, control, scale)
        down, mid = net(x, t, *conditioning, control, scale)
        return down, mid


def _add(a, b):
    if isinstance(a, tuple):
        return [p + q for p, q in zip(a[0], b[0], strict=True)], a[1] + b[1]
    return [p + q for p, q in zip(a, b, strict=True)]


def check_control(pipe, r, family: str) -> Control:
    """The ControlNet arguments of a request, checked before any work: a control image for every
    ControlNet, lists of one value per net, 0 <= start < end <= 1; SD3's skip-layer guidance and
    SD3 image-to-image / inpainting are not combined with ControlNets (refused)."""
    nets = controlnets_of(pipe)
    given = {name: getattr(r, name) for name in CONTROL}
    if not nets:
        if given["control_image"] is not None and family != "flux":  # FLUX: Canny / Depth take it
            raise InputError("control_image needs a ControlNet: fastflow.load(model, controlnet=PATH)")
        changed = [n for n, d in zip(CONTROL[1:], (1.0, 0.0, 1.0), strict=True) if not _is_number(given[n], d)]
        if changed:
            raise InputError(f"{', '.join(changed)} set, but this pipeline has no ControlNet "
                             "(fastflow.load(model, controlnet=PATH))")  # fmt: skip
        if getattr(r, "control_mode", None) is not None:
            raise InputError("control_mode needs a union ControlNet: fastflow.load(model, controlnet=PATH)")
        return Control()
    count = len(nets)
    if given["control_image"] is None:
        raise InputError(f"this pipeline has {count} ControlNet(s): pass control_image= (one image per ControlNet)")
    images = given["control_image"]
    if count == 1:
        images = images if isinstance(images, list) and len(images) == 1 else [images]
    elif not isinstance(images, (list, tuple)) or len(images) != count:
        raise InputError(f"control_image: give a list of {count} images, one per ControlNet")
    scales = _per_net(given["controlnet_conditioning_scale"], "controlnet_conditioning_scale", count)
    starts = _per_net(given["control_guidance_start"], "control_guidance_start", count)
    ends = _per_net(given["control_guidance_end"], "control_guidance_end", count)
    for s, e in zip(starts, ends, strict=True):
        if not 0.0 <= s < e <= 1.0:
            raise InputError(f"control_guidance_start {s} / end {e}: need 0 <= start < end <= 1")
    if family == "sd3" and (getattr(r, "image", None) is not None or getattr(r, "strength", None) is not None):
        raise InputError("image-to-image / inpainting with an SD3 ControlNet is not supported yet (FLUX and SDXL "
                         "only): pass control_image alone")  # fmt: skip
    if getattr(r, "skip_guidance_layers", None):
        raise InputError("skip-layer guidance with a ControlNet is not supported (diffusers' ControlNet pipeline "
                         "has none): leave skip_guidance_layers unset")  # fmt: skip
    depths = {len(net.controlnet_blocks) for net in nets if isinstance(net, MMDiTControlNet)}
    if len(depths) > 1:
        raise InputError(f"SD3 ControlNets of different depths ({sorted(depths)} blocks) cannot be summed")
    if any(getattr(net.config, "extra_conditioning_channels", 0) for net in nets):
        raise InputError("ControlNets with extra conditioning channels (inpainting ControlNets) are not supported yet")
    follow_base(pipe)
    modes = _modes(getattr(r, "control_mode", None), nets)
    if family == "flux":
        _check_flux(pipe, r, nets)
    loaded = [_image(im, "control_image") for im in images]
    for net, im in zip(nets, loaded, strict=True):
        channels = getattr(net.config, "conditioning_channels", 3)
        if isinstance(im, torch.Tensor) and im.shape[1] != channels:
            raise InputError(f"control_image has {im.shape[1]} channels; this ControlNet takes {channels}")
    return Control(nets, loaded, scales, starts, ends, modes=modes)


def _modes(value, nets) -> list:
    """One control mode per net: an int below a union net's num_mode, None for other nets; a single
    value is given to every net (diffusers), a list must have one per net."""
    count = len(nets)
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InputError(f"control_mode has {len(value)} values for {count} ControlNet(s): give one per ControlNet")
        values = list(value)
    else:
        values = [value] * count
    for net, mode in zip(nets, values, strict=True):
        modes = getattr(net.config, "num_mode", None)
        if modes is None:
            if mode is not None:
                raise InputError("control_mode is for union ControlNets; this ControlNet has no control modes: "
                                 "leave control_mode unset (or None for this net in a list)")  # fmt: skip
            continue
        if mode is None:
            raise InputError(f"this union ControlNet needs control_mode= (an int, 0 .. {modes - 1})")
        if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode < modes:
            raise InputError(f"control_mode {mode!r}: this union ControlNet has modes 0 .. {modes - 1}")
    return values


def _check_flux(pipe, r, nets) -> None:
    """FLUX ControlNets: on dev / schnell only (not Fill / Canny / Depth / Kontext), all FLUX
    ControlNets, all with the same numbers of blocks (their residuals are summed per block)."""
    config = pipe.config
    if config.conditioning or config.kontext:
        raise InputError(f"{config.name} does not take ControlNets: load FLUX.1 dev or schnell with them")
    if not all(isinstance(net, FluxControlNet) for net in nets):
        raise InputError("a FLUX pipeline drives FLUX ControlNets only")
    if len({getattr(net, "pixel_control", False) for net in nets}) > 1:
        raise InputError("XLabs FLUX ControlNets and InstantX-style ones add their residuals differently: "
                         "use nets of one kind together")  # fmt: skip
    depths = {(len(net.controlnet_blocks), len(net.controlnet_single_blocks)) for net in nets}
    if len(depths) > 1:
        raise InputError(f"FLUX ControlNets of different depths ({sorted(depths)} double / single blocks) "
                         "cannot be summed")  # fmt: skip
