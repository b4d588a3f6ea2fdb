"""``generate --from IMAGE``: the prompt, seed and settings a fastflow image stores (PNG text
chunks; JPEG and WebP: EXIF ImageDescription), read without decoding pixels and validated field by
field, so that a crafted file gives a typed one-line error, never a crash, a hang or a terminal
escape sequence."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

from ..errors import FastflowError, InputError
from ..pipelines.settings import MAX_STEPS
from .common import MAX_SAVED_SIDE, MAX_UPSCALE, SAMPLERS, safe_text

MAX_TEXT = 1 << 20  # bytes of metadata read (a real one is < 2 KB)
MAX_PROMPT = 100_000  # characters


def _int(lo: int, hi: int):
    def check(v):
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    return check, f"an integer from {lo} to {hi}"


def _float(lo: float, hi: float):
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        return ok and math.isfinite(v) and lo <= v <= hi

    return check, f"a finite number from {lo} to {hi}"


def _text(limit: int):
    return (lambda v: isinstance(v, str) and len(v) <= limit), f"text of at most {limit} characters"


# generate's argument <- (the settings key a fastflow image stores, its check)
FIELDS = {
    "height": ("height", _int(1, MAX_SAVED_SIDE)),
    "width": ("width", _int(1, MAX_SAVED_SIDE)),
    "steps": ("num_inference_steps", _int(1, MAX_STEPS)),
    "guidance": ("guidance_scale", _float(0, 1e4)),
    "sampler": ("sampler", ((lambda v: v in SAMPLERS), f"one of {', '.join(SAMPLERS)}")),
    "negative_prompt": ("negative_prompt", _text(MAX_PROMPT)),
    "true_cfg": ("true_cfg_scale", _float(0, 1e4)),
    "upscale": ("upscale", _int(1, MAX_UPSCALE)),
}
OTHER = {"model": _text(200), "model_path": _text(4096)}


def read_metadata(path: str) -> dict:
    """{"prompt", "seed", "settings"} from an image fastflow wrote; every failure an InputError."""
    from PIL import Image

    from ..loading.files import open_regular

    where = f"--from {safe_text(path, 300)}"
    try:
        fd, _ = open_regular(Path(path).expanduser(), "--from image")
    except FastflowError as e:
        raise InputError(f"{where}: cannot read it as an image ({getattr(e, 'problem', e)})") from None
    with os.fdopen(fd, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(f) as im:  # reads the header and the chunks before the pixels only
                if im.width * im.height > (Image.MAX_IMAGE_PIXELS or 1 << 62):
                    raise Image.DecompressionBombError("too many pixels")
                fmt, info = im.format, dict(im.info)
                exif = im.getexif().get(0x010E) if fmt in ("JPEG", "WEBP") else None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{where}: refused as a decompression bomb ({e})") from None
        except (OSError, ValueError, SyntaxError, EOFError, KeyError, TypeError, IndexError, MemoryError) as e:
            # Pillow: unknown format, truncated chunk, a zTXt over its MAX_TEXT_CHUNK, bad EXIF
            raise InputError(f"{where}: cannot read it as an image ({type(e).__name__}: {e})") from None
    if fmt == "PNG":
        fields = {k: info.get(k) for k in ("prompt", "seed", "settings")}
        if not isinstance(fields["settings"], str) or not isinstance(fields["prompt"], str):
            raise InputError(f"{where}: not an image fastflow wrote (no prompt / settings in it)")
        fields["settings"] = _json(fields["settings"], where, "settings")
        seed = fields["seed"]
        fields["seed"] = None if seed in (None, "") else _seed(seed, where)
    elif fmt in ("JPEG", "WEBP"):
        if isinstance(exif, bytes):
            exif = exif.decode("ascii", "replace")
        if not isinstance(exif, str) or '"settings"' not in exif:
            raise InputError(f"{where}: not an image fastflow wrote (no fastflow metadata in its EXIF)")
        fields = _json(exif, where, "EXIF ImageDescription")
    else:
        raise InputError(f"{where}: a {fmt} image; fastflow writes PNG, JPEG and WebP")
    return _validated(fields, where)


def _json(text: str, where: str, what: str):
    from ..loading.files import parse_json

    if len(text) > MAX_TEXT:
        raise InputError(f"{where}: its {what} are {len(text)} characters (limit {MAX_TEXT})")
    try:
        return parse_json(text.encode("utf-8", "surrogatepass"), None, what, max_depth=8)
    except FastflowError:
        raise InputError(f"{where}: its {what} are not valid JSON") from None


def _seed(value, where: str) -> int:
    try:
        seed = int(value) if isinstance(value, str) and len(value) <= 40 else value
    except ValueError:
        seed = value
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise InputError(f"{where}: its seed {safe_text(repr(value), 60)} is not an integer from 0 to 2**64-1")
    return seed


def _validated(fields, where: str) -> dict:
    if not isinstance(fields, dict) or not isinstance(fields.get("settings"), dict):
        raise InputError(f"{where}: its settings are not a JSON object")
    prompt, settings = fields.get("prompt"), fields["settings"]
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT:
        raise InputError(f"{where}: its prompt is not text of at most {MAX_PROMPT} characters")
    seed = fields.get("seed")
    seed = None if seed is None else _seed(seed, where)
    checks = {key: check for key, check in FIELDS.values()} | OTHER
    for key, (check, what) in checks.items():
        value = settings.get(key)
        if value is not None and not check(value):
            shown = safe_text(repr(value), 60)
            raise InputError(f"{where}: its setting {key} is {shown}; a fastflow image stores {what}")
    return {"prompt": prompt, "seed": seed, "settings": settings}
