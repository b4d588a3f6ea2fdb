"""``fastflow generate --model SVD --image in.png -o clip.mp4``: Stable Video Diffusion's branch of
``fastflow generate`` (docs/video.md). The video options, the checks that keep video and image
runs apart (typed errors before any loading), and the run: one clip per -n, written with
``fastflow.export_video`` (.mp4, .webp, .gif), never over an existing file (numbered instead)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import InputError

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")
ONLY_VIDEO_SUFFIXES = (".mp4", ".gif")  # .webp is an image too
# argparse attribute -> flag: the options of a video run
VIDEO_FLAGS = {
    "frames": "--frames",
    "fps": "--fps",
    "motion_bucket": "--motion-bucket",
    "noise_aug": "--noise-aug",
    "decode_chunk": "--decode-chunk",
    "min_guidance": "--min-guidance",
    "max_guidance": "--max-guidance",
}
# the image families' options, refused with a video model
IMAGE_FLAGS = {
    "guidance": "--guidance (video: --min-guidance / --max-guidance)",
    "negative_prompt": "--negative-prompt",
    "true_cfg": "--true-cfg",
    "strength": "--strength",
    "mask": "--mask",
    "controlnet": "--controlnet",
    "control_image": "--control-image",
    "controlnet_scale": "--controlnet-scale",
    "control_mode": "--control-mode",
    "lora": "--lora",
    "cache": "--cache",
    "parallel": "--parallel",
    "from_image": "--from",
    "sampler": "--sampler",
    "vae": "--vae",
    "config": "--config",
    "upscale": "--upscale",
    "clip_l": "--clip-l",
    "clip_g": "--clip-g",
    "t5": "--t5",
}


def add_arguments(p) -> None:
    g = p.add_argument_group("video (Stable Video Diffusion: --image in.png -o clip.mp4|.webp|.gif; docs/video.md)")
    g.add_argument("--frames", type=int, default=None, help="frames of the clip (default: the model's, 14 or 25)")
    g.add_argument("--fps", type=int, default=None, help="frames a second: conditions the model and the file (7)")
    g.add_argument("--motion-bucket", type=int, default=None, help="motion amount, 0-511 (127)")
    g.add_argument("--noise-aug", type=float, default=None, help="noise added to the image, 0-1 (0.02)")
    g.add_argument("--decode-chunk", type=int, default=None, help="frames the VAE decodes at once (all); less memory")
    g.add_argument("--min-guidance", type=float, default=None, help="guidance of the first frame (1.0)")
    g.add_argument("--max-guidance", type=float, default=None, help="guidance of the last frame (3.0; <= 1: none)")


def is_video_model(path: Path) -> bool:
    """Whether ``path`` holds Stable Video Diffusion (its loader decides; False where it is not installed)."""
    if not path.exists() or importlib.util.find_spec("fastflow.loading.svd") is None:
        return False
    from ..loading.svd import is_svd

    return bool(is_svd(path))


def wanted(args, model: Path, video_model: bool) -> bool:
    """Whether this is a video run; a video output or option with an image model is an InputError."""
    suffix = Path(args.output).suffix.lower()
    if video_model:
        return True
    if suffix in ONLY_VIDEO_SUFFIXES:
        raise InputError(
            f"-o {args.output} is a video, but {model.name} is an image model: pass a Stable Video Diffusion "
            "model with --model (and --image), or an image file name (.png, .jpg, .webp)"
        )
    given = [flag for attr, flag in VIDEO_FLAGS.items() if getattr(args, attr, None) is not None]
    if given:
        raise InputError(f"{given[0]} is a video option, and {model.name} is an image model")
    return False


def _free(path: Path) -> Path:
    """``path``, or ``stem-N.suffix`` with the first free N: never overwrite a file."""
    n, out = 1, path
    while out.exists():
        out = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return out


def run(args, model: Path, device, dtype) -> int:
    from ..api import load
    from ..pipelines.video_export import export_video
    from .output import check_output

    prompts = [*(args.prompt_opt or ()), *args.prompt]
    if prompts:
        raise InputError(f"{model.name} makes a video from --image, not from a prompt: drop the prompt")
    if args.image is None:
        raise InputError(f"{model.name} is a video model: pass the first frame with --image in.png")
    image = Path(args.image).expanduser()
    if not image.is_file():
        raise InputError(f"--image {args.image}: {'no such file' if not image.exists() else 'not a regular file'}")
    refused = [flag for attr, flag in IMAGE_FLAGS.items() if getattr(args, attr, None) not in (None, False, [])]
    if refused:
        raise InputError(f"{refused[0]} does not apply to a video model ({model.name})")
    output = Path(args.output).expanduser()
    if output.is_dir():
        output = output / "fastflow.mp4"
    if output.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"-o {args.output}: a video model writes {', '.join(VIDEO_SUFFIXES)} files")
    if not 1 <= args.num_images <= 100:
        raise InputError(f"-n must be from 1 to 100 clips, got {args.num_images}")
    for flag, value in (("-H", args.height), ("-W", args.width), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    check_output(output)
    pipe = load(model, variant=args.variant, device=device, dtype=dtype, quant=args.quant)
    pipe.set_progress_bar_config(disable=args.no_progress)
    fps = 7 if args.fps is None else args.fps
    given = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "num_inference_steps": args.steps,
        "min_guidance_scale": args.min_guidance,
        "max_guidance_scale": args.max_guidance,
        "fps": args.fps,
        "motion_bucket_id": args.motion_bucket,
        "noise_aug_strength": args.noise_aug,
        "decode_chunk_size": args.decode_chunk,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    for i in range(args.num_images):
        seed = args.seed + i if args.seed not in (None, -1) else None
        out = pipe(str(image), seed=seed, output_type="np", **kwargs)
        path = export_video(out.frames[0], _free(output), fps=fps)
        print(f"wrote {path} (seed {out.seeds[0]}, {out.frames.shape[1]} frames)")
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in out.timings.items())
    print(f"{out.settings['model']}: {out.settings['num_inference_steps']} steps, {timings}")
    return 0
