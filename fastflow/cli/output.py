"""Writing images: the -o path checked before any work, names claimed atomically (never
overwritten), bytes written through a temporary file with the prompt, seed and settings in them."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .. import __version__
from ..errors import InputError, OutputError
from ..loading.files import file_mode


def claim_path(path: Path) -> Path:
    """Atomically claim ``path``, or the first free ``stem-N.suffix`` (O_CREAT | O_EXCL, so two
    processes writing the same name never pick the same file); returns the claimed path, which
    holds an empty placeholder until :func:`save_png` replaces it."""
    n = 0
    while True:
        candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return candidate
        except FileExistsError:
            n += 1


def _output_folder(path: Path) -> Path:
    """The folder of ``path``, created if missing; ``path`` itself must not be a folder."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {folder}: {e.strerror}") from None
    if path.is_dir():
        raise OutputError(f"-o {path} is a folder: pass a file name such as {path / 'fastflow.png'}")
    return folder


def check_output(path: Path) -> None:
    """Before any work: the output folder exists (or can be made) and is writable."""
    folder = _output_folder(path)
    try:  # the only reliable test of writability (permissions, read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastflow-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"cannot write into the output folder {folder} ({e.strerror}): pass another -o path"
        ) from None


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
NAME_MARGIN = 24  # the temporary's ".NAME.XXXXXXXX.tmp" and a claim's "-N" around the name


def image_format(path: Path) -> str | None:
    """PNG / JPEG / WEBP from the suffix (``.png`` alone is a file named .png), else None."""
    suffix = path.suffix or (path.name if path.name.startswith(".") else "")
    return IMAGE_FORMATS.get(suffix.lower())


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder if folder.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def output_path(text: str) -> Path:
    """``-o``: an image file name (.png, .jpg/.jpeg, .webp) or an existing folder (then
    ``FOLDER/fastflow.png``); anything else is refused before any work."""
    path = Path(text).expanduser()
    limit = _name_max(path.parent if str(path.parent) else Path(".")) - NAME_MARGIN
    if len(os.fsencode(path.name)) > limit:
        raise InputError(
            f"-o: the file name is {len(os.fsencode(path.name))} bytes; this filesystem allows {limit} "
            "(with room for a temporary and a -N suffix): pass a shorter name"
        )
    if path.is_dir():
        return path / "fastflow.png"
    if image_format(path) is None:
        raise InputError(f"-o {text}: name an image file ending in {', '.join(IMAGE_FORMATS)} (or an existing folder)")
    return path


def a1111_parameters(prompt: str, seed, settings: dict) -> str:
    """The ``parameters`` text other tools (A1111, ComfyUI readers, civitai) show for an image."""
    lines = [prompt]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields = {
        "Steps": settings.get("num_inference_steps"),
        "Sampler": settings.get("sampler"),
        "CFG scale": settings.get("guidance_scale"),
        "Seed": seed,
        "Size": f"{settings.get('width')}x{settings.get('height')}",
        "Model": settings.get("model"),
        "Version": f"fastflow {__version__}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


EXIF_DESCRIPTION = 0x010E  # ImageDescription


def _slow_write_for_tests() -> None:
    """FASTFLOW_TEST_SLOW_SAVE=SECONDS holds a save open mid-write (tests send signals then)."""
    delay = os.environ.get("FASTFLOW_TEST_SLOW_SAVE")
    if delay:
        import time

        time.sleep(min(float(delay), 30.0))


def save_png(image, path: Path, prompt: str, seed, settings: dict) -> Path:
    """Write the image (format from the suffix: PNG, JPEG or WebP) with the prompt, seed and
    settings (PNG: text chunks, plus A1111's ``parameters``; JPEG: that text as the comment);
    returns the path used.

    The name is claimed atomically and the bytes go to a temporary file in the same folder that
    replaces the claim in one rename: concurrent runs never overwrite each other, and an
    interrupted save leaves no partial file behind."""
    import json

    from PIL.PngImagePlugin import PngInfo

    fmt = image_format(path) or "PNG"
    parameters = a1111_parameters(prompt, seed, settings)
    options = {}
    if fmt == "PNG":
        info = PngInfo()
        info.add_text("prompt", prompt)
        info.add_text("seed", "" if seed is None else str(seed))
        info.add_text("settings", json.dumps(settings, sort_keys=True))
        info.add_text("parameters", parameters)
        info.add_text("software", f"fastflow {__version__}")
        options["pnginfo"] = info
    else:  # JPEG and WebP: the fields as ASCII JSON in EXIF ImageDescription (--from reads them)
        from PIL import Image

        exif = Image.Exif()
        exif[EXIF_DESCRIPTION] = json.dumps({"prompt": prompt, "seed": seed, "settings": settings}, sort_keys=True)
        options.update(quality=95, exif=exif.tobytes())
        if fmt == "JPEG":
            options["comment"] = parameters.encode("utf-8")
    _output_folder(path)  # writability shows in the claim itself (an OSError becomes an OutputError)
    target = tmp = None
    try:
        target = claim_path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600; the user's umask decides
            image.save(f, format=fmt, **options)
            f.flush()
            _slow_write_for_tests()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        return target
    except BaseException as e:
        for leftover in (tmp, target):
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {target or path}: {e.strerror or e}") from None
        raise
