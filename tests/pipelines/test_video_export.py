"""fastflow.export_video: every accepted frames layout gives the same pixels; MP4 (PyAV, read back
with PyAV: frame count, size, frame rate, pixels within the codec's error), GIF and WebP (Pillow,
read back: frame count, size, frame times, looping, pixels); bad input is a typed error before
anything is written, and a failed write leaves no file behind (nor a temporary)."""

import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import fastflow
from fastflow import errors
from fastflow.pipelines import video_export
from fastflow.pipelines.video_export import export_video, frames_to_uint8


def smooth_video(frames=6, height=32, width=48, seed=0) -> np.ndarray:
    """[F, H, W, 3] float32 in [0, 1]: smooth random colour fields drifting from frame to frame (a
    clip, as a codec expects one), each frame different."""
    g = torch.Generator().manual_seed(seed)
    start, drift = torch.rand(2, 1, 3, height // 8, width // 8, generator=g)
    mix = torch.linspace(0, 1, frames)[:, None, None, None]
    low = (1 - mix) * start + mix * drift
    video = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=True)
    return video.permute(0, 2, 3, 1).contiguous().numpy()


def as_uint8(video: np.ndarray) -> np.ndarray:
    return (video * 255).round().astype(np.uint8)


def read_animation(path):
    with Image.open(path) as im:
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            im.load()
            durations.append(im.info["duration"])
            frames.append(np.asarray(im.convert("RGB")))
        return np.stack(frames), durations, im.info.get("loop"), im.format


def read_mp4(path):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = (stream.codec_context.name, stream.average_rate, stream.width, stream.height)
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, info


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


# the same video in every layout export_video takes
def layouts(video: np.ndarray):
    u8 = as_uint8(video)
    pil = [Image.fromarray(f) for f in u8]
    t = torch.from_numpy(video)
    return {
        "pil": pil,
        "pil_out_frames": [pil],  # a pipeline's whole out.frames holding one video
        "np_float": video,
        "np_uint8": u8,
        "np_batch": video[None],
        "pt_fchw": t.permute(0, 3, 1, 2),
        "pt_fhwc": t,
        "pt_uint8": torch.from_numpy(u8).permute(0, 3, 1, 2),
        "pt_bf16_batch": t.permute(0, 3, 1, 2)[None].to(torch.bfloat16),
    }


def test_every_layout_gives_the_same_pixels():
    video = smooth_video()
    want = as_uint8(video)
    for name, frames in layouts(video).items():
        got = frames_to_uint8(frames)
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        tol = 1 if name == "pt_bf16_batch" else 0  # bf16 keeps 8 bits of mantissa
        assert np.abs(got.astype(int) - want.astype(int)).max() <= tol, name


def test_export_video_is_exported_from_the_package():
    assert fastflow.export_video is export_video


@pytest.mark.parametrize("fps,duration", [(7, 143), (8, 125), (25, 40), (0.5, 2000)])
def test_webp_round_trip(tmp_path, fps, duration):
    video = smooth_video(frames=5)
    path = export_video(layouts(video)["pil"], tmp_path / "clip.webp", fps=fps)
    assert path == tmp_path / "clip.webp" and listing(tmp_path) == ["clip.webp"]
    frames, durations, loop, fmt = read_animation(path)
    assert fmt == "WEBP" and loop == 0
    assert frames.shape == (5, 32, 48, 3)
    assert durations == [duration] * 5
    err = np.abs(frames.astype(int) - as_uint8(video).astype(int))
    assert err.mean() < 4.0 and err.max() <= 48, (err.mean(), err.max())  # lossy, colour at half size


@pytest.mark.parametrize("fps,duration", [(7, 140), (10, 100), (50, 20), (3, 330)])
def test_gif_round_trip(tmp_path, fps, duration):
    video = smooth_video(frames=4, seed=1)
    path = export_video(torch.from_numpy(video).permute(0, 3, 1, 2), tmp_path / "clip.GIF", fps=fps)
    frames, durations, loop, fmt = read_animation(path)
    assert fmt == "GIF" and loop == 0
    assert frames.shape == (4, 32, 48, 3)
    assert durations == [duration] * 4
    err = np.abs(frames.astype(int) - as_uint8(video).astype(int))
    assert err.mean() < 6.0, err.mean()  # 256 colours a frame


def test_identical_frames_keep_the_playback_time(tmp_path):
    """GIF / WebP encoders store a run of identical frames as one longer frame."""
    video = np.repeat(smooth_video(frames=2, seed=2), [3, 1], axis=0)
    for name in ("a.gif", "a.webp"):
        _, durations, _, _ = read_animation(export_video(video, tmp_path / name, fps=10))
        assert sum(durations) == 400, (name, durations)


@pytest.mark.parametrize("layout", ["pil", "np_float", "pt_fchw", "pt_bf16_batch"])
@pytest.mark.parametrize("fps", [7, 24, 29.97])
def test_mp4_round_trip(tmp_path, layout, fps):
    pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    video = smooth_video(frames=7, height=64, width=96, seed=3)
    path = export_video(layouts(video)[layout], tmp_path / "clip.mp4", fps)
    assert listing(tmp_path) == ["clip.mp4"]
    frames, (codec, rate, width, height) = read_mp4(path)
    assert codec == "h264" and (width, height) == (96, 64)
    assert rate == Fraction(fps).limit_denominator(1001)
    assert frames.shape == (7, 64, 96, 3)
    err = np.abs(frames.astype(int) - as_uint8(video).astype(int))
    # most of it is yuv420p's half-size colour (these random fields are far more colourful than a clip)
    assert err.mean() < 6.5 and np.percentile(err, 99) <= 28, (err.mean(), np.percentile(err, 99))
    av = pytest.importorskip("av")
    subsampled = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p") for f in as_uint8(video)]
    subsampled = np.stack([f.to_ndarray(format="rgb24") for f in subsampled])
    codec_err = np.abs(frames.astype(int) - subsampled.astype(int))
    assert codec_err.mean() < 4.0, codec_err.mean()  # CRF 18 on top of the subsampling (steep fields: ~2-3)
    # frame order is kept: each decoded frame is nearest its own source frame
    dist = np.abs(frames[:, None].astype(int) - as_uint8(video)[None].astype(int)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(7)).all()


def test_an_existing_file_is_replaced_whole(tmp_path):
    target = tmp_path / "clip.gif"
    target.write_bytes(b"old")
    export_video(smooth_video(frames=2), target, 5)
    assert read_animation(target)[0].shape[0] == 2 and listing(tmp_path) == ["clip.gif"]


BAD_INPUTS = {
    "empty list": ([], "clip.gif", 7, errors.InputError, "empty"),
    "empty array": (np.zeros((0, 8, 8, 3), np.uint8), "clip.gif", 7, errors.InputError, "no pixels"),
    "zero width": (np.zeros((2, 8, 0, 3), np.uint8), "clip.gif", 7, errors.InputError, "no pixels"),
    "mixed sizes": ([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))], "clip.gif", 7, errors.InputError, "same"),
    "not an image": ([Image.new("RGB", (8, 8)), "frame.png"], "clip.webp", 7, errors.InputError, "PIL"),
    "two videos": ([[Image.new("RGB", (8, 8))]] * 2, "clip.gif", 7, errors.InputError, "2 videos"),
    "two videos array": (np.zeros((2, 3, 8, 8, 3)), "clip.gif", 7, errors.InputError, "2 videos"),
    "4 channels": (np.zeros((2, 8, 8, 4), np.uint8), "clip.gif", 7, errors.InputError, r"\[F, H, W, 3\]"),
    "3-d tensor": (torch.zeros(3, 8, 8), "clip.gif", 7, errors.InputError, r"\[F, 3, H, W\]"),
    "float out of range": (np.full((2, 8, 8, 3), 1.5), "clip.gif", 7, errors.InputError, r"\[0, 1\]"),
    "minus one to one": (torch.full((2, 3, 8, 8), -1.0), "clip.gif", 7, errors.InputError, r"\(x \+ 1\) / 2"),
    "nan": (np.full((2, 8, 8, 3), np.nan), "clip.webp", 7, errors.InputError, "NaN"),
    "int64": (np.zeros((2, 8, 8, 3), np.int64), "clip.gif", 7, errors.InputError, "uint8"),
    "a string": ("frames/", "clip.gif", 7, errors.InputError, "list of PIL"),
    "odd size mp4": (np.zeros((2, 9, 8, 3), np.uint8), "clip.mp4", 7, errors.InputError, "even"),
    "odd width mp4": (np.zeros((2, 8, 7, 3), np.uint8), "clip.mp4", 7, errors.InputError, "even"),
    "unknown suffix": (np.zeros((2, 8, 8, 3), np.uint8), "clip.avi", 7, errors.InputError, ".mp4"),
    "no suffix": (np.zeros((2, 8, 8, 3), np.uint8), "clip", 7, errors.InputError, ".mp4"),
    "fps zero": (np.zeros((2, 8, 8, 3), np.uint8), "clip.webp", 0, errors.InputError, "fps"),
    "fps negative": (np.zeros((2, 8, 8, 3), np.uint8), "clip.mp4", -7, errors.InputError, "fps"),
    "fps nan": (np.zeros((2, 8, 8, 3), np.uint8), "clip.mp4", float("nan"), errors.InputError, "fps"),
    "fps huge": (np.zeros((2, 8, 8, 3), np.uint8), "clip.mp4", 1e6, errors.InputError, "fps"),
    "fps bool": (np.zeros((2, 8, 8, 3), np.uint8), "clip.webp", True, errors.InputError, "fps"),
    "fps text": (np.zeros((2, 8, 8, 3), np.uint8), "clip.webp", "7", errors.InputError, "fps"),
    "fps too high for gif": (np.zeros((2, 8, 8, 3), np.uint8), "clip.gif", 60, errors.InputError, "1/100 s"),
    "missing folder": (np.zeros((2, 8, 8, 3), np.uint8), "no/such/clip.gif", 7, errors.OutputError, "does not exist"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_typed_error_before_writing(tmp_path, name):
    frames, filename, fps, error, match = BAD_INPUTS[name]
    with pytest.raises(error, match=match):
        export_video(frames, tmp_path / filename, fps)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("path", [None, "", 7, b"clip.gif"])
def test_a_path_that_is_not_a_file_name_is_refused(path):
    with pytest.raises(errors.InputError, match="file name"):
        export_video(smooth_video(frames=2), path, 7)


def test_a_folder_as_the_path_is_refused(tmp_path):
    (tmp_path / "out.mp4").mkdir()
    with pytest.raises(errors.OutputError, match="is a folder"):
        export_video(smooth_video(frames=2), tmp_path / "out.mp4", 7)
    assert listing(tmp_path / "out.mp4") == []


def test_numpy_and_tensor_fps_accepted(tmp_path):
    export_video(smooth_video(frames=2), tmp_path / "a.webp", np.float32(8))
    export_video(smooth_video(frames=2), tmp_path / "b.webp", torch.tensor(8))
    assert read_animation(tmp_path / "a.webp")[1] == read_animation(tmp_path / "b.webp")[1] == [125, 125]


def test_without_pyav_mp4_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    with pytest.raises(errors.OutputError, match=r"fastflow\[video\]"):
        export_video(smooth_video(frames=2), tmp_path / "clip.mp4", 7)
    assert listing(tmp_path) == []
    export_video(smooth_video(frames=2), tmp_path / "clip.gif", 7)  # Pillow formats need no PyAV


def test_pyav_without_libx264_names_what_to_install(tmp_path, monkeypatch):
    av = pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    monkeypatch.setattr(av, "codecs_available", set(av.codecs_available) - {"libx264"})
    with pytest.raises(errors.OutputError, match="libx264"):
        export_video(smooth_video(frames=2), tmp_path / "clip.mp4", 7)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, suffix):
    """An encoder failing half way: no target, no temporary; an older file of the name survives."""
    if suffix == ".mp4":
        pytest.importorskip("av", reason="PyAV (the video extra) is not installed")
    target = tmp_path / f"clip{suffix}"
    target.write_bytes(b"the previous clip")
    writer = "_write_mp4" if suffix == ".mp4" else "_write_animation"
    real = getattr(video_export, writer)

    def half_then_fail(*args):
        real(*args)  # the temporary holds a whole file by now
        raise KeyboardInterrupt

    monkeypatch.setattr(video_export, writer, half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        export_video(smooth_video(frames=3), target, 7)
    assert listing(tmp_path) == [target.name] and target.read_bytes() == b"the previous clip"


def test_an_os_error_is_an_output_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video_export.tempfile, "mkstemp", refuse)
    with pytest.raises(errors.OutputError, match="Permission denied"):
        export_video(smooth_video(frames=2), tmp_path / "clip.webp", 7)
    assert listing(tmp_path) == []
