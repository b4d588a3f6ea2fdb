"""``fastflow.export_video``: a clip's frames to an .mp4 (H.264 through PyAV, the ``video`` extra),
an animated .webp or an animated .gif (Pillow, the ``pipeline`` extra).

Frames are what a video pipeline returns for one video (``out.frames[0]``): a list of PIL images,
a numpy array [F, H, W, 3] (float in [0, 1], or uint8) or a torch tensor [F, 3, H, W] or
[F, H, W, 3] (same value ranges); ``out.frames`` itself is taken when it holds exactly one video.
Everything is checked before a byte is written (typed errors from :mod:`fastflow.errors`), and the
file is written to a temporary beside the target and renamed over it at the end, so an error or an
interrupt never leaves a half-written file (an existing file of that name is replaced whole).

Format notes, each a property of the format rather than a choice:
- MP4: H.264 (libx264, CRF 18, yuv420p: plays everywhere), frame rate exact as a fraction. yuv420p
  stores colour at half resolution, so the width and height must be even: an odd size is refused
  (crop or pad it yourself, or write .webp / .gif, which take any size); nothing is padded silently.
- GIF: 256 colours per frame (Pillow quantises), frame times in hundredths of a second, so a frame
  lasts round(100 / fps) centiseconds and fps is at most 50 (browsers slow shorter delays down).
- WebP: lossy, quality 95, frame times in milliseconds (round(1000 / fps)).
- GIF and WebP encoders merge identical consecutive frames into one longer frame: the playback
  time is unchanged, the count of stored frames may be smaller.
- Both animations loop forever.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, OutputError, plain_number

FORMATS = {".mp4": "MP4", ".webp": "WEBP", ".gif": "GIF"}
MAX_FPS = {"MP4": 240.0, "WEBP": 240.0, "GIF": 50.0}
MIN_FPS = 0.01  # 100 s a frame: the longest a frame time fits every format's field (GIF: 655 s)
MAX_FRAMES = 100_000
MAX_SIDE = 16384
MP4_CRF = 18
WEBP_QUALITY = 95
INSTALL_AV = 'pip install "fastflow[video]" (or pip install av)'


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: name a video file ending in {', '.join(FORMATS)} (the suffix picks the format)")
    return fmt


def _check_fps(fps, fmt: str) -> float:
    fps = plain_number(fps)
    if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not math.isfinite(fps):
        raise InputError(f"fps must be a finite number, got {fps!r}")
    top = MAX_FPS[fmt]
    if not MIN_FPS <= fps <= top:
        extra = " (GIF stores frame times in 1/100 s; write .mp4 or .webp for more)" if fmt == "GIF" else ""
        raise InputError(f"fps must be from {MIN_FPS} to {top:g} for {fmt}, got {fps!r}{extra}")
    return float(fps)


def _check_folder(path: Path) -> Path:
    if path.is_dir():
        raise OutputError(f"{path} is a folder: pass a file name such as {path / 'clip.mp4'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{path}: the folder {folder} does not exist: create it first")
    return folder


def _one_video(frames):
    """Unwrap a pipeline's whole ``out.frames`` when it holds a single video."""
    if isinstance(frames, (list, tuple)) and len(frames) == 1 and isinstance(frames[0], (list, tuple)):
        return frames[0]
    if isinstance(frames, (list, tuple)) and frames and isinstance(frames[0], (list, tuple)):
        raise InputError(f"frames hold {len(frames)} videos: export one at a time (out.frames[i])")
    if isinstance(frames, (np.ndarray, torch.Tensor)) and frames.ndim == 5:
        if frames.shape[0] != 1:
            raise InputError(f"frames hold {frames.shape[0]} videos (shape {tuple(frames.shape)}): pass frames[i]")
        return frames[0]
    return frames


def _from_pil(frames) -> np.ndarray:
    from PIL import Image

    out = []
    for i, im in enumerate(frames):
        if not isinstance(im, Image.Image):
            raise InputError(f"frame {i} is a {type(im).__name__}: a frame list must hold only PIL images")
        if out and im.size != (out[0].shape[1], out[0].shape[0]):
            raise InputError(
                f"frame {i} is {im.size[0]}x{im.size[1]}, frame 0 {out[0].shape[1]}x{out[0].shape[0]}: "
                "every frame of a video must have the same size"
            )
        out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def _from_array(a: np.ndarray, layout: str) -> np.ndarray:
    """[F, H, W, 3] uint8 from a uint8 or float array in [0, 1]."""
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind != "f":
        raise InputError(f"frames of dtype {a.dtype}: pass uint8 (0..255) or floats in [0, 1]")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise InputError("frames hold NaN or Inf: nothing to encode (check the generation's output)")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        raise InputError(
            f"float frames must lie in [0, 1] ({layout}, as a pipeline's np / pt output); these span "
            f"[{lo:.3g}, {hi:.3g}]: map [-1, 1] to [0, 1] with (x + 1) / 2 first"
        )
    return (a * 255).round().astype(np.uint8)


def frames_to_uint8(frames) -> np.ndarray:
    """One video's frames as a [F, H, W, 3] uint8 array (see the module docstring for what is taken)."""
    frames = _one_video(frames)
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError("frames is empty: a video needs at least one frame")
        if len(frames) > MAX_FRAMES:
            raise InputError(f"{len(frames)} frames: at most {MAX_FRAMES} are written")
        video = _from_pil(frames)
    elif isinstance(frames, torch.Tensor):
        t = frames.detach().cpu()
        if t.ndim == 4 and t.shape[1] == 3 and t.shape[-1] != 3:
            t = t.permute(0, 2, 3, 1)  # [F, 3, H, W] (diffusers' pt layout) -> [F, H, W, 3]
        elif not (t.ndim == 4 and t.shape[-1] == 3):
            raise InputError(f"a frames tensor must be [F, 3, H, W] or [F, H, W, 3], got {tuple(t.shape)}")
        if t.dtype == torch.bfloat16:
            t = t.float()
        video = _from_array(t.numpy(), "a tensor")
    elif isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"a frames array must be [F, H, W, 3], got {frames.shape}")
        video = _from_array(frames, "an array")
    else:
        raise InputError(
            f"frames is a {type(frames).__name__}: pass a list of PIL images, a numpy array [F, H, W, 3] "
            "or a torch tensor [F, 3, H, W] / [F, H, W, 3]"
        )
    f, h, w, _ = video.shape
    if f == 0 or h == 0 or w == 0:
        raise InputError(f"frames of shape {tuple(video.shape)} hold no pixels")
    if f > MAX_FRAMES or max(h, w) > MAX_SIDE:
        raise InputError(f"{f} frames of {w}x{h}: at most {MAX_FRAMES} frames of at most {MAX_SIDE} pixels a side")
    return video


def _h264():
    """PyAV, checked to bundle libx264, or a typed error naming what to install."""
    try:
        import av
    except ImportError:
        raise OutputError(
            f"writing .mp4 needs PyAV, which is not installed: {INSTALL_AV}; or write .webp / .gif"
        ) from None
    if "libx264" not in getattr(av, "codecs_available", ()):
        raise OutputError(
            f"this PyAV ({getattr(av, '__version__', '?')}) has no libx264 H.264 encoder: install PyAV's "
            "own wheel from PyPI (pip install --force-reinstall av), whose FFmpeg bundles it; or write .webp / .gif"
        )
    return av


def _write_mp4(av, video: np.ndarray, fps: float, dst: str) -> None:
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(dst, mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(MP4_CRF)})
        stream.width, stream.height = video.shape[2], video.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_animation(video: np.ndarray, fps: float, dst: str, fmt: str) -> None:
    from PIL import Image

    images = [Image.fromarray(frame) for frame in video]
    if fmt == "GIF":
        options = {"duration": 10 * round(100 / fps), "loop": 0}
    else:
        options = {"duration": round(1000 / fps), "loop": 0, "quality": WEBP_QUALITY}
    images[0].save(dst, format=fmt, save_all=True, append_images=images[1:], **options)


def _file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def export_video(frames, path, fps: float = 7) -> Path:
    """Write one video's ``frames`` to ``path`` (.mp4, .webp or .gif, from the suffix) at ``fps``
    frames a second (SVD's default, 7, if not given); returns the path written. Typed errors before
    any writing: InputError for the frames, fps or suffix, OutputError for the folder or a missing
    encoder (the message names what to install)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InputError(f"path must be a file name such as clip.mp4, got {path!r}")
    path = Path(os.fspath(path)).expanduser()
    fmt = _format(path)
    fps = _check_fps(fps, fmt)
    folder = _check_folder(path)
    video = frames_to_uint8(frames)
    av = None
    if fmt == "MP4":
        h, w = video.shape[1:3]
        if h % 2 or w % 2:
            raise InputError(
                f"frames are {w}x{h}: H.264 in yuv420p needs an even width and height; crop or pad the frames "
                "(SVD's sizes are multiples of 64), or write .webp / .gif, which take any size"
            )
        av = _h264()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; the user's umask decides, as for any new file
        if fmt == "MP4":
            _write_mp4(av, video, fps, tmp)
        else:
            _write_animation(video, fps, tmp, fmt)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        return path
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
