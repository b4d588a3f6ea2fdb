"""The HTTP API's requests and errors: strict validation of a generation request (unknown fields,
wrong types and out-of-range values are refused, never ignored) into a :class:`Work` the engine
runs, and :class:`ApiError`, answered as ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from ..caching import POLICIES

SEED_LIMIT = 2**53  # seeds a JSON reader (JavaScript) keeps exactly; random seeds are drawn below it
MAX_PROMPT_CHARS = 4000
MAX_LORAS = 8
SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable", 504: "timeout_error"}  # fmt: skip


class ApiError(Exception):
    """An answer other than success: HTTP ``status``, a message that says what to do, a ``code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"), "code": self.code}}


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know of the served pipeline."""

    name: str
    family: str
    multiple: int
    max_side: int
    default_size: tuple[int, int]  # (height, width)
    steps: int
    sampler: str
    samplers: tuple[str, ...]
    guidance: bool  # takes guidance_scale
    negative: bool  # takes negative_prompt (CFG)
    kontext: bool
    inpaint: bool  # takes mask_image
    img2img: bool  # takes image + strength
    fill: bool = False  # FLUX.1 Fill: edits need image and mask

    def describe(self) -> dict:
        h, w = self.default_size
        return {"id": self.name, "object": "model", "owned_by": "fastflow", "family": self.family,
                "default_size": f"{w}x{h}", "size_multiple": self.multiple, "max_side": self.max_side,
                "default_steps": self.steps, "default_sampler": self.sampler, "samplers": list(self.samplers),
                "guidance_scale": self.guidance, "negative_prompt": self.negative, "edits": self.edits}  # fmt: skip

    @property
    def edits(self) -> list[str]:
        kinds = (["kontext"] if self.kontext else []) + (["image-to-image"] if self.img2img else [])
        return kinds + (["inpainting"] if self.inpaint or self.fill else [])


@dataclass
class Work:
    """One validated request: what a pipeline call needs, the seeds of its images, and the key
    of the requests it may share a call with (same everything but prompt and seeds)."""

    prompt: str
    seeds: list[int]
    width: int
    height: int
    steps: int
    sampler: str
    guidance: float | None = None
    negative_prompt: str | None = None
    cache: str | None = None
    loras: tuple = ()  # ((name, scale), ...) sorted by name
    stream: bool = False
    strength: float | None = None
    image: object = None  # PIL image (edits)
    mask: object = None
    image_digest: str | None = None  # what makes two edits of the same image shareable

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def key(self) -> tuple:
        return (self.width, self.height, self.steps, self.sampler, self.guidance, self.negative_prompt, self.cache,
                self.loras, self.strength, self.image_digest)  # fmt: skip

    def settings(self, model: str) -> dict:
        return {"model": model, "size": f"{self.width}x{self.height}", "num_inference_steps": self.steps,
                "guidance_scale": self.guidance, "sampler": self.sampler, "negative_prompt": self.negative_prompt,
                "cache": self.cache, "loras": [{"name": n, "scale": s} for n, s in self.loras],
                **({"strength": self.strength} if self.strength is not None else {})}  # fmt: skip


@dataclass
class Limits:
    max_images: int
    max_pixels: int
    max_steps: int
    default_cache: str | None = None
    extra_fields: frozenset = field(default_factory=frozenset)


FIELDS = frozenset({"prompt", "n", "size", "response_format", "seed", "negative_prompt", "num_inference_steps",
                    "guidance_scale", "sampler", "cache", "loras", "stream", "model", "user"})  # fmt: skip


def bad(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code)


def _int(body: dict, name: str, lo: int, hi: int, default=None, too_many=None):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(f"{name} must be an integer, got {type(value).__name__}")
    if value > hi and too_many is not None:
        raise ApiError(413, too_many.format(value=value, hi=hi), "too_many_images")
    if not lo <= value <= hi:
        raise bad(f"{name} must be from {lo} to {hi}, got {value}")
    return value


def _text(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(f"{name} is required", "missing_field")
        return None
    if not isinstance(value, str):
        raise bad(f"{name} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise bad(f"{name} must not be empty", "missing_field")
    if len(value) > MAX_PROMPT_CHARS:
        raise ApiError(413, f"{name} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}", "prompt_too_long")
    if "\x00" in value:
        raise bad(f"{name} must not contain NUL characters")
    return value


def parse_size(value, model: ModelInfo, limits: Limits) -> tuple[int, int]:
    """``"WxH"`` -> (width, height): each a multiple of the model's, within its side limit and the
    server's pixel limit (413 beyond it)."""
    if value is None:
        return model.default_size[1], model.default_size[0]
    match = SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise bad(f'size must be "WIDTHxHEIGHT" (e.g. "{model.default_size[1]}x{model.default_size[0]}"), '
                  f"got {value!r}"[:200])  # fmt: skip
    w, h = int(match[1]), int(match[2])
    m = model.multiple
    if w < m or h < m or w % m or h % m:
        raise bad(f"size {w}x{h}: width and height must be positive multiples of {m} for {model.name}")
    if max(w, h) > model.max_side:
        raise bad(f"size {w}x{h}: {model.name} takes at most {model.max_side} px per side")
    if w * h > limits.max_pixels:
        raise ApiError(413, f"size {w}x{h} is {w * h} pixels; this server allows {limits.max_pixels}", "too_large")
    return w, h


def parse_loras(value, resolve) -> tuple:
    """``[{"name" | "path", "scale"}]`` -> ((resolved name, scale), ...); ``resolve(entry)``
    checks a name or a path (the LoRA registry: 400 / 404)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad(f"loras must be a list of {{name or path, scale}} objects, got {type(value).__name__}")
    if len(value) > MAX_LORAS:
        raise bad(f"at most {MAX_LORAS} LoRAs per request, got {len(value)}")
    out = {}
    for entry in value:
        if not isinstance(entry, dict):
            raise bad("each loras entry must be an object with name (or path) and scale")
        unknown = sorted(set(entry) - {"name", "path", "scale"})
        if unknown:
            raise bad(f"loras entry: unknown field {unknown[0]!r} (name, path, scale)", "unknown_field")
        if ("name" in entry) == ("path" in entry):
            raise bad("each loras entry takes a name or a path (not both)")
        scale = entry.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise bad(f"loras scale must be a number, got {scale!r}"[:200])
        if not -10.0 <= scale <= 10.0:
            raise bad(f"loras scale must be from -10 to 10, got {scale}")
        name = resolve(entry)
        if name in out:
            raise bad(f"LoRA {name!r} is named twice")
        out[name] = float(scale)
    return tuple(sorted(out.items()))


def parse_generation(body, model: ModelInfo, limits: Limits, resolve_lora) -> Work:
    """A request body (parsed JSON, or an edit's form fields already typed) -> Work, or ApiError."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", "invalid_json")
    known = FIELDS | limits.extra_fields
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(known))}", "unknown_field")
    if body.get("model") not in (None, model.name):
        raise ApiError(404, f"model {body['model']!r} is not served here; this server serves {model.name!r}",
                       "model_not_found")  # fmt: skip
    _text(body, "user")
    prompt = _text(body, "prompt", required=True)
    n = _int(body, "n", 1, limits.max_images, 1, "n={value}: this server makes at most {hi} images per request")
    if body.get("response_format", "b64_json") != "b64_json":
        raise bad(f'response_format {body["response_format"]!r} is not supported: use "b64_json"'[:200])
    width, height = parse_size(body.get("size"), model, limits)
    steps = _int(body, "num_inference_steps", 1, limits.max_steps, model.steps)
    sampler = body.get("sampler") or model.sampler
    if sampler not in model.samplers:
        raise bad(f"sampler {sampler!r} is not one of {model.name}'s: {', '.join(model.samplers)}"[:300])
    guidance = body.get("guidance_scale")
    if guidance is not None:
        if not model.guidance:
            raise bad(f"{model.name} has no guidance scale (guidance-distilled without a guidance input)")
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance <= 100:
            raise bad(f"guidance_scale must be a number from 0 to 100, got {guidance!r}"[:200])
        guidance = float(guidance)
    negative = _text(body, "negative_prompt")
    if negative is not None and not model.negative:
        raise bad(f"{model.name} takes no negative_prompt (it runs without classifier-free guidance)")
    cache = body.get("cache", limits.default_cache)
    if cache == "none":
        cache = None
    if cache is not None and cache not in POLICIES:
        raise bad(f'cache {cache!r} is not a policy name: use one of {", ".join(POLICIES)} or "none"'[:300])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream must be true or false, got {stream!r}"[:200])
    seed = body.get("seed")
    if seed is None or seed == -1:
        first = random.randrange(SEED_LIMIT - limits.max_images)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise bad(f"seed must be an integer from 0 to 2**63 - 1 (or -1 / null: random), got {seed!r}"[:200])
    else:
        first = seed
    loras = parse_loras(body.get("loras"), resolve_lora)
    return Work(prompt, [first + i for i in range(n)], width, height, steps, sampler, guidance, negative, cache,
                loras, stream)  # fmt: skip
