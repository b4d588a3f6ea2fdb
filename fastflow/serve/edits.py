"""POST /v1/images/edits: a multipart form (``image``, optional ``mask``, ``prompt`` and the
generation fields, plus ``strength``) -> a :class:`~.protocol.Work` with the decoded images.

What an edit is depends on the model: a Kontext model edits ``image`` by the prompt (no mask, no
strength); FLUX.1 dev / schnell, SD3 and SDXL run image-to-image (``strength``: the pipeline's default,
0.6 for FLUX / SD3, 0.3 for SDXL as diffusers) and,
with ``mask`` (white: repaint), inpainting. Anything else is refused with a 400."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math

from .protocol import FIELDS, ApiError, Limits, ModelInfo, bad, parse_generation

MAX_INPUT_PIXELS = 64 * 2**20  # an input image's header may not claim more (decompression bombs)
INTS = ("n", "seed", "num_inference_steps")
FLOATS = ("guidance_scale", "strength")
EDIT_FIELDS = frozenset({"strength"})


def _typed(name: str, text: str):
    """A form field's text as the JSON value it stands for."""
    try:
        if name in INTS:
            return int(text)
        if name in FLOATS:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise bad(f"{name} must be a number, got {text!r}"[:200]) from None
    if name == "stream":
        if text.lower() not in ("true", "false"):
            raise bad(f"stream must be true or false, got {text!r}"[:200])
        return text.lower() == "true"
    if name == "loras":
        try:
            return json.loads(text)
        except ValueError:
            raise bad("loras must be a JSON list of {name or path, scale} objects") from None
    return text


def read_image(upload, what: str, mode: str):
    """An uploaded PNG / JPEG / WebP as a PIL image in ``mode`` (400 for anything else)."""
    from PIL import Image, UnidentifiedImageError

    data = upload.file.read() if hasattr(upload, "file") else None
    if not data:
        raise bad(f"{what} must be an uploaded image file (multipart), got no file", "invalid_image")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in ("PNG", "JPEG", "WEBP"):
            raise bad(f"{what} must be a PNG, JPEG or WebP image, got {image.format}", "invalid_image")
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ApiError(413, f"{what} is {image.width}x{image.height}: over {MAX_INPUT_PIXELS} pixels", "too_large")
        image.load()
    except Image.DecompressionBombError:  # PIL's own limit, from the header
        raise ApiError(413, f"{what} is over {MAX_INPUT_PIXELS} pixels", "too_large") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise bad(f"{what} is not a readable image", "invalid_image") from None
    return image.convert(mode), hashlib.sha256(data).hexdigest()


def default_size(image, model: ModelInfo) -> str:
    """The output size of an edit without ``size``: the input's, scaled down to the model's trained
    area keeping its aspect, on the model's multiple (Kontext: its preferred resolution)."""
    if model.kontext:
        from ..pipelines.images import kontext_size

        w, h = kontext_size(image.width, image.height, model.multiple)
        return f"{w}x{h}"
    area = model.default_size[0] * model.default_size[1]
    shrink = min(1.0, math.sqrt(area / (image.width * image.height)))
    m = model.multiple
    return f"{max(m, int(image.width * shrink) // m * m)}x{max(m, int(image.height * shrink) // m * m)}"


async def parse_edit(request, model: ModelInfo, limits: Limits, resolve_lora):
    if not model.edits:
        raise bad(f"{model.name} cannot edit images (no image-to-image, Kontext or inpainting)", "edits_unsupported")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad("/v1/images/edits takes multipart/form-data (image, optional mask, prompt, ...)", "invalid_form")
    try:
        form = await request.form(max_files=2, max_fields=len(FIELDS) + 4)
    except Exception:
        raise bad("the multipart form could not be read", "invalid_form") from None
    fields, files = {}, {}
    for name, value in form.multi_items():
        if name in fields or name in files:
            raise bad(f"field {name!r} is given twice")
        if isinstance(value, str):
            fields[name] = value
        else:
            files[name] = value
    unknown = sorted(set(files) - {"image", "mask"})
    if unknown:
        raise bad(f"unknown file field {unknown[0]!r}; edits take image and mask", "unknown_field")
    if "image" in fields or "mask" in fields:
        raise bad("image and mask must be uploaded files", "invalid_image")
    if "image" not in files:
        raise bad("image is required (the image to edit, as a file)", "missing_field")
    body = {name: _typed(name, text) for name, text in fields.items()}
    strength = body.pop("strength", None)
    image, digest = await asyncio.to_thread(read_image, files["image"], "image", "RGB")  # decoding: off the loop
    mask = None
    if model.fill and "mask" not in files:
        raise bad(f"{model.name} (FLUX.1 Fill) needs a mask (white: repaint)", "missing_field")
    if "mask" in files:
        if not (model.inpaint or model.fill):
            raise bad(f"{model.name} does not inpaint (no mask)", "inpainting_unsupported")
        mask, mask_digest = await asyncio.to_thread(read_image, files["mask"], "mask", "L")
        digest += mask_digest
    if strength is not None:  # else the pipeline's default (image-to-image 0.6, Fill 1.0), reported back
        if model.kontext or not (model.img2img or model.fill):
            raise bad(f"{model.name} edits by the prompt (Kontext): strength does not apply", "invalid_value")
        if not 0 < strength <= 1:
            raise bad(f"strength must be in (0, 1], got {strength}")
    body.setdefault("size", default_size(image, model))
    work = parse_generation(body, model, limits, resolve_lora)
    if mask is not None and mask.size != image.size:
        raise bad(f"mask is {mask.width}x{mask.height}, image {image.width}x{image.height}: they must match")
    work.image, work.mask, work.strength, work.image_digest = image, mask, strength, digest
    return work
