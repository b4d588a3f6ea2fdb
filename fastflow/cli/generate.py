"""``fastflow generate``: images from a prompt (text-to-image, image-to-image, Kontext edits),
each saved with its prompt, seed and settings; ``--from IMAGE`` re-runs a saved one. A Stable
Video Diffusion model makes a clip from ``--image`` instead (cli/video.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import InputError
from ..loading.source import DEFAULT_MODEL
from . import video
from .common import (
    DTYPES,
    MAX_SAVED_SIDE,
    MAX_UPSCALE,
    SAMPLERS,
    cpu_threads,
    device_and_dtype,
    parse_cache,
    parse_lora_arg,
    safe_text,
    threads_arg,
)
from .output import check_output, output_path, save_png

MAX_CLI_IMAGES = 10_000  # -n beyond the pipeline's per-call cap runs in batches
TEXT_ROLES = {"clip-l": "CLIP-L", "clip-g": "OpenCLIP-G", "t5": "T5"}  # --ROLE: text_encoders={"clip_l": ...}


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="make images from a prompt (--image: image-to-image, Kontext: edit)")
    p.add_argument("prompt", nargs="*", default=[], help="the prompt(s): each makes -n images (or -p)")
    p.add_argument(
        "-p",
        "--prompt",
        dest="prompt_opt",
        action="append",
        default=None,
        metavar="PROMPT",
        help="a prompt; repeatable (-p A -p B makes -n images of each; -p A B too)",
    )
    p.add_argument(
        "-o",
        "--output",
        default="fastflow.png",
        help="image path (.png, .jpg, .webp) or a folder; a video model's clip: .mp4, .webp or .gif; never "
        "overwritten (numbered instead)",
    )
    p.add_argument("--model", default=None, help="pipeline folder or transformer file (default: the embedded model)")
    p.add_argument("--variant", default=None, help="e.g. flux-kontext-dev, sd3.5-large-turbo")
    p.add_argument("--vae", default=None, help="with a single-file --model: the VAE (a .safetensors file or folder)")
    for role, name in TEXT_ROLES.items():
        p.add_argument(
            f"--{role}",
            default=None,
            metavar="FILE_OR_FOLDER",
            help=f"with a single-file --model: the {name} text encoder (a folder, or a file with --{role}-tokenizer)",
        )
        p.add_argument(f"--{role}-tokenizer", default=None, metavar="FOLDER", help=f"the {name} tokenizer folder")
    p.add_argument(
        "--config",
        default=None,
        help="JSON (inline or a .json file): the transformer's config fields where no registered config "
        'fits and no config.json describes it, e.g. \'{"depth": 2, "depth_single_blocks": 4}\'',
    )
    p.add_argument("-H", "--height", type=int, default=None)
    p.add_argument("-W", "--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the variant's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the variant's)")
    p.add_argument("--negative-prompt", default=None, help="SD3 (CFG), or FLUX with --true-cfg > 1")
    p.add_argument("--true-cfg", type=float, default=None, help="FLUX: true CFG scale against --negative-prompt")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (then +1 each); -1: random")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to make (1-10000, in batches of 64)")
    p.add_argument(
        "--image", default=None, help="input image: image-to-image (dev, schnell, SD3), or the image to edit (Kontext)"
    )
    p.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:SCALE]",
        help="a LoRA file (diffusers, kohya, BFL or XLabs format), scale 1 unless given; repeatable",
    )
    p.add_argument(
        "--strength", type=float, default=None, help="image-to-image: how much of --image to redraw, (0, 1] (0.6)"
    )
    p.add_argument("--controlnet", action="append", metavar="PATH", help="a ControlNet's diffusers folder; repeatable")
    p.add_argument(
        "--control-image",
        action="append",
        metavar="IMG",
        help="a control map: one per --controlnet, or without --controlnet the FLUX.1 Canny / Depth model's "
        "(canny edges: fastflow.canny; a depth map), its size the default",
    )
    p.add_argument(
        "--controlnet-scale", action="append", type=float, metavar="S", help="its scale (1.0); one, or one per net"
    )
    p.add_argument(
        "--control-mode", action="append", type=int, metavar="M",
        help="a FLUX union ControlNet's control mode; one, or one per net (-1: none, for a net without modes)",
    )  # fmt: skip
    p.add_argument(
        "--mask", default=None, metavar="IMG", help="with --image: inpaint, white pixels of IMG repainted, black kept"
    )
    p.add_argument(
        "--from",
        dest="from_image",
        default=None,
        help="re-run a fastflow image: its prompt, seed and settings fill what the command line leaves unset",
    )
    p.add_argument("--sampler", default=None, choices=SAMPLERS)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPES),
        help="default: bfloat16 on GPU; on CPU bfloat16 where it has native bf16 (AVX512-BF16 / AMX-BF16: see "
        "fastflow doctor), else float32",
    )
    p.add_argument(
        "--upscale",
        type=int,
        default=None,
        help="nearest-neighbour upscale of the saved PNG, for viewing (default: the model's, usually 1)",
    )
    p.add_argument(
        "--threads",
        default=None,
        help="CPU threads (default: FASTFLOW_NUM_THREADS, else 1 for small models and all cores for large ones)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--cache",
        default=None,
        help="feature caching: fbcache|teacache|taylorseer|dbcache[:THRESHOLD] or a schedule .json (tune-cache); "
        "UNets (SDXL, SVD): deepcache[:INTERVAL[:BRANCH]]",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=["fp8", "int8", "none"],
        help="fp8 / int8: quantize the transformer's linear layers while loading (int8: W8A8, fast on CPUs); "
        "none: dequantize an FP8 / int8 file "
        "(default: as the file is)",
    )
    p.add_argument(
        "--parallel",
        default=None,
        metavar="SIZES",
        help="under torchrun: split each generation over the processes, e.g. ulysses=2,ring=2 or cfg=2,data=2 "
        "(sizes of ulysses / ring / cfg / data multiplying to the number of processes; docs/parallel.md)",
    )
    video.add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import load

    model = Path(args.model).expanduser() if args.model else DEFAULT_MODEL
    if video.wanted(args, model, args.model is not None and video.is_video_model(model)):  # cli/video.py
        return video.run(args, model, *device_and_dtype(args.device, args.dtype))
    if args.from_image is not None:
        _settings_from_image(args)
    prompts = [*(args.prompt_opt or ()), *args.prompt]
    if not prompts:
        raise InputError('no prompt: fastflow generate "a handwritten seven" (or -p TEXT)')
    model = Path(args.model) if args.model else DEFAULT_MODEL
    if not args.model and not model.is_dir():
        raise InputError("no default model is installed with this build: pass --model <folder or file>")
    device, dtype = device_and_dtype(args.device, args.dtype)
    if args.upscale is not None and not 1 <= args.upscale <= MAX_UPSCALE:
        raise InputError(f"--upscale must be from 1 to {MAX_UPSCALE}, got {args.upscale}")
    if not 1 <= args.num_images <= MAX_CLI_IMAGES:
        raise InputError(f"-n must be from 1 to {MAX_CLI_IMAGES}, got {args.num_images}")
    for flag, value in (("-H", args.height), ("-W", args.width), ("--steps", args.steps)):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be a positive integer, got {value}")
    if args.image is not None and not Path(args.image).expanduser().is_file():
        missing = not Path(args.image).expanduser().exists()
        raise InputError(f"--image {args.image}: {'no such file' if missing else 'not a regular file'}")
    loras = [parse_lora_arg(spec) for spec in args.lora or ()]
    control = _control_args(args)
    if args.strength is not None and not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    if args.strength is not None and args.image is None:
        raise InputError("--strength needs --image (image-to-image)")
    if args.mask is not None and args.image is None:
        raise InputError("--mask needs --image (the image to inpaint)")
    if args.mask is not None and not Path(args.mask).expanduser().is_file():
        missing = not Path(args.mask).expanduser().exists()
        raise InputError(f"--mask {args.mask}: {'no such file' if missing else 'not a regular file'}")
    output = output_path(args.output)
    check_output(output)
    config = None
    if args.config is not None:
        from ..loading.described import parse_config_arg

        config = parse_config_arg(args.config)
    threads = threads_arg(args.threads)
    vae, text_encoders = _components(args)
    sizes = _parallel_sizes(args.parallel)
    pipe = load(
        model,
        variant=args.variant,
        device=device,
        dtype=dtype,
        quant=args.quant,
        config=config,
        vae=vae,
        text_encoders=text_encoders,
        controlnet=args.controlnet,
    )
    writer = _parallel(pipe, sizes)
    pipe.set_progress_bar_config(disable=args.no_progress or not writer)
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads or cpu_threads(pipe))
        pipe.num_threads = None  # set for the whole run here; the pipeline call leaves it
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    kwargs = {
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "sampler": args.sampler,
    }
    if args.negative_prompt is not None:
        kwargs["negative_prompt"] = args.negative_prompt
    if args.true_cfg is not None:
        if pipe.config.family != "flux":
            raise InputError("--true-cfg is FLUX's option: SD3 and SDXL run CFG with --guidance")
        kwargs["true_cfg_scale"] = args.true_cfg
    if args.image is not None:
        kwargs["image"] = args.image
    if args.strength is not None:
        kwargs["strength"] = args.strength
    if args.mask is not None:
        kwargs["mask_image"] = args.mask
    if args.cache is not None:
        kwargs["cache"], kwargs["cache_threshold"] = parse_cache(args.cache)
    kwargs.update(control)
    generated = max(args.height or pipe.default_size[0], args.width or pipe.default_size[1])
    upscale = args.upscale
    if upscale is None:  # the model's viewing upscale, no more than the saved-side limit allows
        upscale = max(1, min(getattr(pipe, "view_upscale", 1), MAX_SAVED_SIDE // generated))
    side = generated * upscale
    max_side = getattr(pipe, "max_side", None)
    if max_side is not None and generated > max_side:
        raise InputError(
            f"-H/-W {generated} px is beyond {pipe.config.name}'s limit of {max_side} px per side "
            f"(4x its trained size): pass -H and -W of at most {max_side}"
        )
    if side > MAX_SAVED_SIDE:
        if upscale == 1:
            raise InputError(f"-H/-W {generated} px is beyond the saved-image limit of {MAX_SAVED_SIDE} px per side")
        raise InputError(
            f"--upscale {upscale} would save {side} px images (limit {MAX_SAVED_SIDE} px per side): "
            f"pass --upscale {max(1, MAX_SAVED_SIDE // generated)} or less"
        )
    _warn_size(pipe, args.height, args.width)
    for prompt in prompts:
        out, settings = _generate(pipe, prompt, args, kwargs, model, output, upscale, writer)
    if not writer:
        return 0
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in out.timings.items())
    saved = ""
    if settings["cache"]:
        saved = f", cache {settings['cache']} saved {out.stats['work_saved']:.0%} of block work"
    print(f"{settings['model']}: {settings['num_inference_steps']} steps, {timings}{saved}")
    return 0


def _parallel_sizes(text):
    """``--parallel``, checked before any loading: the sizes, or None for a one-process run."""
    from ..parallel import ParallelConfig, launched

    if text is None:
        if launched():
            raise InputError(
                "fastflow generate runs under torchrun here (WORLD_SIZE > 1) without --parallel: every process "
                "would make the same images; pass --parallel, e.g. --parallel data=N or ulysses=2,ring=2"
            )
        return None
    sizes = ParallelConfig.parse(text)
    if not launched():
        raise InputError(
            f"--parallel {text} needs several processes: run under torchrun, e.g. `torchrun --nproc-per-node "
            f"{sizes.world_size} -m fastflow generate ... --parallel {text}`"
        )
    return sizes


def _parallel(pipe, sizes) -> bool:
    """Split the pipeline over torchrun's processes. Returns whether this process writes the files
    and prints (rank 0: every rank ends with every image, and one writer keeps the numbering global
    with nothing written twice)."""
    if sizes is None:
        return True
    import atexit

    import torch.distributed as dist

    ours = not dist.is_initialized()
    pipe.enable_parallelism(**vars(sizes))
    if ours:  # joined here from torchrun's environment: left cleanly at exit
        atexit.register(dist.destroy_process_group)
    return dist.get_rank() == 0


def _generate(pipe, prompt, args, kwargs, model, output, upscale, writer=True):
    """-n images of one prompt, in batches of at most the pipeline's per-call cap."""
    total, done = args.num_images, 0
    while done < total:
        count = min(total - done, pipe.max_images_per_call)
        seed = args.seed + done if args.seed not in (None, -1) else args.seed
        out = pipe(prompt, **dict(kwargs, num_images_per_prompt=count, seed=seed))
        done += count
        # no absolute paths in what is shared with the image: the model's folder or file name
        settings = dict(out.settings, model_path=model.name, upscale=upscale)
        if not writer:
            continue
        if args.negative_prompt is not None:
            settings["negative_prompt"] = args.negative_prompt
        for image, image_seed in zip(out.images, out.seeds, strict=True):
            if upscale > 1:
                from PIL import Image

                image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
            path = save_png(image, output, prompt, image_seed, settings)
            print(f"wrote {path} (seed {image_seed})")
    return out, settings


def _components(args):
    """--vae and --clip-l / --clip-g / --t5 (each with its --ROLE-tokenizer) -> load()'s vae= and
    text_encoders= (None where none is given: the model folder's own)."""
    vae = None if args.vae is None else _existing(args.vae, "--vae")
    encoders = {}
    for role in TEXT_ROLES:
        attr = role.replace("-", "_")
        model, tokenizer = getattr(args, attr), getattr(args, attr + "_tokenizer")
        if model is None:
            if tokenizer is not None:
                raise InputError(f"--{role}-tokenizer needs --{role} (the text encoder it belongs to)")
            continue
        model = _existing(model, f"--{role}")
        if tokenizer is None and model.is_file():
            raise InputError(f"--{role} {model} is a single file: pass its tokenizer folder with --{role}-tokenizer")
        encoders[attr] = model if tokenizer is None else (model, _existing(tokenizer, f"--{role}-tokenizer"))
    return vae, encoders or None


def _control_args(args) -> dict:
    """--controlnet / --control-image / --controlnet-scale, checked before loading: one image per net."""
    nets, images, scales = args.controlnet or [], args.control_image or [], args.controlnet_scale or []
    flux_control = not nets and len(images) == 1 and not scales  # a FLUX.1 Canny / Depth model's control map
    if not flux_control and (len(images) != len(nets) or (scales and len(scales) not in (1, len(nets)))):
        raise InputError(f"{len(nets)} --controlnet, {len(images)} --control-image, {len(scales)} --controlnet-scale: "
                         "give one control image per ControlNet (and one scale, or one per ControlNet)")  # fmt: skip
    args.controlnet = [_existing(n, "--controlnet") for n in nets] or None
    for image in images:
        if not Path(image).expanduser().is_file():
            raise InputError(f"--control-image {image}: no such file (or not a regular file)")
    images = [str(Path(image).expanduser()) for image in images]
    out = {"control_image": images if len(images) > 1 else images[0]} if images else {}
    if scales:
        out["controlnet_conditioning_scale"] = scales if len(scales) > 1 else scales[0]
    modes = [None if m == -1 else m for m in getattr(args, "control_mode", None) or []]
    if modes and (not nets or len(modes) not in (1, len(nets))):
        raise InputError(f"{len(modes)} --control-mode for {len(nets)} --controlnet: give one, or one per ControlNet")
    if modes:
        out["control_mode"] = modes if len(modes) > 1 else modes[0]
    return out


def _existing(text: str, flag: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {text}: no such file or folder")
    if not (path.is_file() or path.is_dir()):
        raise InputError(f"{flag} {text}: not a regular file or folder (a FIFO or device?)")
    return path


def _settings_from_image(args) -> None:
    """--from IMAGE: the prompt, seed and settings a fastflow image stores (validated field by
    field) fill every argument the command line leaves unset (the model too, when it is the
    embedded one)."""
    from .from_image import FIELDS, read_metadata

    stored = read_metadata(args.from_image)
    settings = stored["settings"]
    if not args.prompt and not args.prompt_opt:
        args.prompt = [stored["prompt"]]
    if args.seed is None and stored["seed"] is not None:
        args.seed = stored["seed"]
    for arg, (key, _) in FIELDS.items():
        if getattr(args, arg) is None and settings.get(key) is not None:
            setattr(args, arg, settings[key])
    if args.model is None and settings.get("model") not in (None, "fastflow-tiny-digits"):
        raise InputError(
            f"--from {safe_text(args.from_image, 300)}: it was made with {safe_text(settings['model'], 200)} "
            f"({safe_text(str(settings.get('model_path')), 200)}): pass --model with its files"
        )


def _warn_size(pipe, height, width) -> None:
    """Sizes beyond twice the model's trained size work but rarely look right: one line on stderr
    (beyond the pipeline's own limit, 4x, it refuses)."""
    trained = max(pipe.default_size)
    side = max(height or 0, width or 0)
    if 2 * trained < side <= getattr(pipe, "max_side", side):
        print(
            f"fastflow: warning: {side} px is beyond {pipe.config.name}'s trained size ({trained} px): "
            "expect poor images and a long run",
            file=sys.stderr,
        )
