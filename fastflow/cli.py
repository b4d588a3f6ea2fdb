"""The ``fastflow`` command: ``generate``, ``quantize``, ``info <checkpoint>``, ``doctor`` and ``smoke``.

Errors from bad input print one line and exit with status 2; an interrupted run exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from . import __version__
from .errors import FastflowError, InputError, OutputError
from .loading.components import DEFAULT_MODEL
from .ops.capability import usable_device

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def output_path(text: str) -> Path:
    """``-o``: an image file name (.png, .jpg/.jpeg, .webp) or an existing folder (then
    ``FOLDER/fastflow.png``); anything else is refused before any work."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path / "fastflow.png"
    if path.suffix.lower() not in IMAGE_FORMATS:
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


def save_png(image, path: Path, prompt: str, seed, settings: dict) -> Path:
    """Write the image (format from the suffix: PNG, JPEG or WebP) with the prompt, seed and
    settings (PNG: text chunks, plus A1111's ``parameters``; JPEG: that text as the comment);
    returns the path used.

    The name is claimed atomically and the bytes go to a temporary file in the same folder that
    replaces the claim in one rename: concurrent runs never overwrite each other, and an
    interrupted save leaves no partial file behind."""
    import json

    from PIL.PngImagePlugin import PngInfo

    fmt = IMAGE_FORMATS.get(path.suffix.lower(), "PNG")
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
    elif fmt == "JPEG":
        options.update(quality=95, comment=parameters.encode("utf-8"))
    else:
        options.update(quality=95)
    _output_folder(path)  # writability shows in the claim itself (an OSError becomes an OutputError)
    target = tmp = None
    try:
        target = claim_path(path)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
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


MAX_UPSCALE = 64
MAX_CLI_IMAGES = 10_000  # -n beyond the pipeline's per-call cap runs in batches
MAX_SAVED_SIDE = 16384


def parse_cache(text: str):
    """``--cache NAME[:THRESHOLD]`` or a schedule .json -> (cache, threshold)."""
    from .caching import POLICIES

    if text.endswith(".json"):
        return text, None
    name, _, threshold = text.partition(":")
    if name not in POLICIES:
        raise InputError(f"--cache {text}: use one of {', '.join(POLICIES)} (optionally NAME:THRESHOLD) or a .json")
    if not threshold:
        return name, None
    try:
        return name, float(threshold)
    except ValueError:
        raise InputError(f"--cache {text}: the threshold after ':' must be a number") from None


def device_and_dtype(device: str | None, dtype: str | None = None) -> tuple[str, torch.dtype]:
    """--device (default: cuda if available) checked, and --dtype (default: bf16 on GPU, fp32 on CPU)."""
    device = usable_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "--device")
    return device, DTYPES[dtype] if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)


def _cmd_generate(args) -> int:
    from .api import load

    if args.from_image is not None:
        _settings_from_image(args)
    prompt = args.prompt_opt if args.prompt_opt is not None else args.prompt
    if prompt is None:
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
        raise InputError(f"--image {args.image}: no such file")
    loras = [parse_lora_arg(spec) for spec in args.lora or ()]
    if args.strength is not None and not 0 < args.strength <= 1:
        raise InputError(f"--strength must be in (0, 1], got {args.strength}")
    if args.strength is not None and args.image is None:
        raise InputError("--strength needs --image (image-to-image)")
    output = output_path(args.output)
    check_output(output)
    config = None
    if args.config is not None:
        from .loading.described import parse_config_arg

        config = parse_config_arg(args.config)
    threads = _threads_arg(args.threads)
    pipe = load(model, variant=args.variant, device=device, dtype=dtype, quant=args.quant, config=config)
    pipe.set_progress_bar_config(disable=args.no_progress)
    if torch.device(device).type == "cpu":
        torch.set_num_threads(threads or cpu_threads(pipe))
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
    if args.cache is not None:
        kwargs["cache"], kwargs["cache_threshold"] = parse_cache(args.cache)
    upscale = args.upscale if args.upscale is not None else getattr(pipe, "view_upscale", 1)
    side = max(args.height or pipe.default_size[0], args.width or pipe.default_size[1]) * upscale
    if side > MAX_SAVED_SIDE:
        raise InputError(
            f"--upscale {upscale} would save {side} px images (limit {MAX_SAVED_SIDE}): pass a smaller --upscale"
        )
    _warn_size(pipe, args.height, args.width)
    total, done = args.num_images, 0
    while done < total:  # batches of at most the pipeline's per-call cap
        count = min(total - done, pipe.max_images_per_call)
        seed = args.seed + done if args.seed not in (None, -1) else args.seed
        out = pipe(prompt, **dict(kwargs, num_images_per_prompt=count, seed=seed))
        # no absolute paths in what is shared with the image: the model's folder or file name
        settings = dict(out.settings, model_path=model.name, upscale=upscale)
        if args.negative_prompt is not None:
            settings["negative_prompt"] = args.negative_prompt
        for image, image_seed in zip(out.images, out.seeds, strict=True):
            if upscale > 1:
                from PIL import Image

                image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
            path = save_png(image, output, prompt, image_seed, settings)
            print(f"wrote {path} (seed {image_seed})")
        done += count
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in out.timings.items())
    saved = ""
    if settings["cache"]:
        saved = f", cache {settings['cache']} saved {out.stats['work_saved']:.0%} of block work"
    print(f"{settings['model']}: {settings['num_inference_steps']} steps, {timings}{saved}")
    return 0


def parse_lora_arg(spec: str) -> tuple[Path, float]:
    """--lora PATH[:SCALE] -> (path, scale); the file must exist."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            path = spec
    if not Path(path).expanduser().is_file():
        raise InputError(f"--lora {path}: no such file")
    return Path(path).expanduser(), scale


_FROM_IMAGE = {  # generate's argument <- the settings key a fastflow image stores
    "height": "height",
    "width": "width",
    "steps": "num_inference_steps",
    "guidance": "guidance_scale",
    "sampler": "sampler",
    "negative_prompt": "negative_prompt",
    "true_cfg": "true_cfg_scale",
    "upscale": "upscale",
}


SMALL_MODEL_PARAMS = 50_000_000  # below this, matmuls are too small to share between cores


def cpu_threads(pipe) -> int:
    """Threads for a CPU run: 1 for small models, whose matmuls are too small to share between
    cores (issue 17 reported the embedded model 15x slower on 2 threads than on 1; re-measured on
    2 cores on 2026-12-04: denoise 0.13-0.15 s on 1 thread and 0.13-0.16 s on 2, so no loss today,
    and 1 thread leaves the other core free); torch's default (all cores) for real models."""
    params = sum(p.numel() for p in pipe.transformer.parameters())
    return 1 if params < SMALL_MODEL_PARAMS else torch.get_num_threads()


def _threads_arg(value) -> int | None:
    """--threads, else FASTFLOW_NUM_THREADS, else None (chosen from the model's size)."""
    source = "--threads"
    if value is None and os.environ.get("FASTFLOW_NUM_THREADS"):
        value, source = os.environ["FASTFLOW_NUM_THREADS"], "FASTFLOW_NUM_THREADS"
    if value is None:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if not 1 <= threads <= 1024:
        raise InputError(f"{source} must be a thread count from 1 to 1024, got {value!r}")
    return threads


def _settings_from_image(args) -> None:
    """--from IMAGE: the prompt, seed and settings a fastflow PNG stores fill every argument the
    command line leaves unset (the model too, when it is the embedded one)."""
    from PIL import Image

    try:
        with Image.open(args.from_image) as im:
            text = dict(getattr(im, "text", {}) or {})
    except OSError as e:
        raise InputError(f"--from {args.from_image}: cannot read it as an image ({e})") from None
    if "settings" not in text or "prompt" not in text:
        raise InputError(f"--from {args.from_image}: not an image fastflow wrote (no prompt / settings in it)")
    try:
        settings = json.loads(text["settings"])
    except json.JSONDecodeError:
        raise InputError(f"--from {args.from_image}: its settings are not valid JSON") from None
    if args.prompt is None and args.prompt_opt is None:
        args.prompt = text["prompt"]
    if args.seed is None and text.get("seed"):
        args.seed = int(text["seed"])
    for arg, key in _FROM_IMAGE.items():
        if getattr(args, arg) is None and settings.get(key) is not None:
            setattr(args, arg, settings[key])
    if args.model is None and settings.get("model") not in (None, "fastflow-tiny-digits"):
        raise InputError(
            f"--from {args.from_image}: it was made with {settings['model']} ({settings.get('model_path')}): "
            "pass --model with its files"
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


def _read_prompts(args, pipe) -> list[str] | None:
    """--prompts FILE (one per line); None for the embedded model's own digit prompts."""
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InputError(f"cannot read --prompts {args.prompts}: {e.strerror}") from None
        prompts = [p.strip() for p in lines if p.strip()]
        if not prompts:
            raise InputError(f"{args.prompts} holds no prompts (one per line)")
        return prompts
    if pipe.config.name != "fastflow-tiny-digits":
        raise InputError("pass --prompts FILE (calibration prompts, one per line) for this model")
    return None


def _calibration(pipe, args):
    from .tuning import Calibration, digits_calibration

    prompts = _read_prompts(args, pipe)
    if prompts is None:
        return digits_calibration(pipe, args.steps, args.images_per_prompt)
    return Calibration(pipe, prompts, args.steps, args.images_per_prompt)


def _tuning_pipe(args):
    from .api import load

    model = Path(args.model) if args.model else DEFAULT_MODEL
    device, dtype = device_and_dtype(args.device)
    pipe = load(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cmd_tune_cache(args) -> int:
    from .caching import Schedule
    from .tuning import search_schedules

    pipe = _tuning_pipe(args)
    calibration = _calibration(pipe, args)
    groups = args.groups or pipe.transformer.num_blocks
    if not 1 <= groups <= pipe.transformer.num_blocks:
        raise InputError(f"--groups must be from 1 to the model's {pipe.transformer.num_blocks} blocks")
    front = search_schedules(
        lambda mask: calibration.loss(Schedule(mask)),
        args.steps,
        groups,
        budget=args.budget,
        population=args.population,
        generations=args.generations,
        seed=args.seed,
        log=print,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'work':>6} {calibration.loss_name:>14}  schedule")
    for c in front:
        info = {"model": pipe.config.name, "steps": args.steps, "work": round(c.work, 4), calibration.loss_name: c.loss}
        path = out / f"{pipe.config.name}-{args.steps}steps-work{c.work:.3f}.json"
        Schedule(c.mask, info=info).save(path)
        print(f"{c.work:>6.3f} {c.loss:>14.4f}  {path}")
    return 0


def _cmd_tune_steps(args) -> int:
    import json

    from .tuning import Calibration, fine_trajectory, refine_steps, search_steps

    pipe = _tuning_pipe(args)
    given = _read_prompts(args, pipe)
    if given is None:
        from .evaluation import NUMBER_WORDS

        prompts = [f"a handwritten {w}" for w in NUMBER_WORDS]
    else:
        prompts = given
    grid = torch.linspace(1, 0, args.fine + 1)
    runs = [(grid, fine_trajectory(pipe, p, 1000 + i, grid)) for i, p in enumerate(prompts)]
    sigmas = search_steps(runs, args.steps)
    print("trajectory-following sigmas:", ", ".join(f"{s:.4f}" for s in sigmas))
    result = {"model": pipe.config.name, "steps": args.steps, "sigmas": sigmas, "fine": args.fine}
    if args.refine:
        if given is None:
            from .tuning import digits_calibration

            calibration = digits_calibration(pipe, args.steps)
        else:
            calibration = Calibration(pipe, prompts, args.steps, reference={"num_inference_steps": args.fine})
        uniform = [1 - i / args.steps for i in range(args.steps)]
        sigmas, loss = refine_steps(lambda s: calibration.loss(sigmas=s), [uniform, sigmas], args.fine)
        result.update(
            sigmas=sigmas,
            **{calibration.loss_name: loss, "uniform " + calibration.loss_name: calibration.loss(sigmas=uniform)},
        )
        print(
            "refined on the calibration set:",
            ", ".join(f"{s:.4f}" for s in sigmas),
            f"({calibration.loss_name} {loss:.4f})",
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result))
        print(f"wrote {args.out} (pass the list as sigmas=...)")
    return 0


def _cmd_quantize(args) -> int:
    from .loading.writer import quantize_checkpoint
    from .quant import DEFAULT_SKIP_GROUPS, Fp8Config, skip_patterns

    groups = DEFAULT_SKIP_GROUPS if args.keep is None else tuple(g for g in args.keep.split(",") if g and g != "none")
    config = Fp8Config(weight=args.weight, skip=skip_patterns(*groups))
    done = quantize_checkpoint(args.input, args.output, config, variant=args.variant, dtype=DTYPES[args.dtype])
    print(
        f"wrote {done['path']}: {done['variant']}, {done['fp8_layers']} FP8 layers, "
        f"{done['bytes'] / 2**30:.2f} GiB ({config.describe()}, kept in {args.dtype}: {', '.join(groups) or 'nothing'})"
    )
    return 0


def _cmd_info(args) -> int:
    from .loading import inspect_checkpoint

    print(inspect_checkpoint(args.path, variant=args.variant).summary())
    folder = Path(args.path)
    if folder.is_dir():  # a pipeline folder: every component, with its size
        from .loading.loader import human_bytes

        parts = sorted(p for p in folder.iterdir() if p.is_dir() and any(p.glob("*.safetensors")))
        if parts:
            print("components:")
        for part in parts:
            files = sorted(part.glob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            print(f"  {part.name + '/':<17} {human_bytes(size):>10} in {len(files)} file(s)")
    return 0


def _cmd_smoke(args) -> int:
    """Round-trip a tiny random-weight FLUX through save -> detect -> load -> forward."""
    from safetensors.torch import save_file

    from .loading import inspect_checkpoint, load_transformer
    from .models import Flux, from_name
    from .models.flux import make_img_ids

    cfg = from_name(args.variant)
    torch.manual_seed(args.seed)
    model = Flux(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.name}.safetensors"
        save_file(model.state_dict(), str(path), metadata={"fastflow.variant": cfg.name})
        print(inspect_checkpoint(path).summary())
        t0 = time.perf_counter()
        loaded = load_transformer(path, dtype=torch.float32)
        t_load = time.perf_counter() - t0
    h, w, n_txt = args.height // 16, args.width // 16, 16
    img = torch.randn(1, h * w, cfg.in_channels)
    txt, y = torch.randn(1, n_txt, cfg.context_in_dim), torch.randn(1, cfg.vec_in_dim)
    guidance = torch.full((1,), 3.5) if cfg.guidance_embed else None
    with torch.no_grad():
        t0 = time.perf_counter()
        out = loaded(img, txt, y, torch.full((1,), 0.5), make_img_ids(h, w), guidance=guidance)
        t_fwd = time.perf_counter() - t0
        ref = model(img, txt, y, torch.full((1,), 0.5), make_img_ids(h, w), guidance=guidance)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(
        f"load {t_load * 1e3:.1f} ms, forward on {h * w} image tokens {t_fwd * 1e3:.1f} ms, "
        f"loaded-vs-original max relative difference {err:.1e}"
    )
    if err != 0.0:
        print("smoke test FAILED: the loaded model differs from the saved one", file=sys.stderr)
        return 1
    print("smoke test passed")
    return 0


def _cmd_doctor(args) -> int:
    import platform

    from . import ops
    from .ops.capability import has_fp8_tensor_cores

    print(f"fastflow {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed (GPU kernels unavailable; reference ops will run)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            fp8 = (
                "FP8 tensor cores"
                if has_fp8_tensor_cores(f"cuda:{i}")
                else "no FP8 tensor cores: FP8 loads dequantized"
            )
            print(f"cuda:{i} {torch.cuda.get_device_name(i)} sm_{cap[0]}{cap[1]} ({fp8})")
    else:
        print("CUDA: no GPU visible; every op runs its plain-torch reference (FP8 layers dequantize per call)")
    gpu = torch.cuda.is_available()
    from .ops import cuda_cpp

    built, why = cuda_cpp.status()
    print(f"CUDA C++ kernels: {why}" if built else f"CUDA C++ kernels: not built: {why}")
    if built and gpu:
        cap = torch.cuda.get_device_capability(0)
        try:
            served = cuda_cpp._serves(cuda_cpp.module().ARCHS, cap)
        except InputError:
            served = False
        if not served:
            print(f"  this GPU: NVRTC compiles csrc/ for sm_{cuda_cpp.nvrtc_arch(cap)} at first use (cached)")
    print(f"op backend: {ops.get_backend()} (kernel backends, in order of preference: "
          f"{' > '.join(ops.KERNEL_BACKENDS)}; set_backend('cuda_cpp') forces the CUDA C++ ones)")  # fmt: skip
    for name, opdef in sorted(ops.OPS.items()):
        backend = opdef.device_backend("cuda")
        where = f"{backend} kernel" if backend and gpu else "reference (torch)"
        have = ", ".join(opdef.impls) or "none"
        print(f"  {name:<34} {where:<20} kernels: {have}")
    if gpu:
        from .ops import attention_backends as ab

        table = ab.read_table().get(ab.machine_key(torch.device("cuda")), {})
        tuned = ", ".join(f"{k}: {v['backend']}" for k, v in sorted(table.items())) or "not tuned (`fastflow tune`)"
        print(f"  attention implementation: {tuned}; default order {' > '.join(ab.DEFAULT_ORDER)}")
    return 0


def _cmd_tune(args) -> int:
    from .ops import attention_backends as ab

    shapes = None
    if args.shapes:
        from .kernels.attention import ATTENTION_SHAPES

        names = [n.strip() for n in args.shapes.split(",")]
        unknown = [n for n in names if n not in ATTENTION_SHAPES]
        if unknown:
            raise InputError(f"unknown attention shapes {unknown}; choose from {sorted(ATTENTION_SHAPES)}")
        shapes = {n: ATTENTION_SHAPES[n] for n in names}
    device = torch.device(args.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise InputError("fastflow tune measures attention on a CUDA GPU; none is visible to torch")
    rows = ab.tune(device, shapes)
    print(f"{'shape':<20} {'dtype':<9} {'backend':<18} {'ms':>8} {'TFLOP/s':>8}")
    for r in rows:
        timing = f"{r['ms']:8.3f} {r['tflops']:8.1f}" if "ms" in r else f"{'-':>8} {'-':>8}  {r['error']}"
        print(f"{r['shape']:<20} {r['dtype']:<9} {r['backend']:<18} {timing}{'  <- chosen' if r['chosen'] else ''}")
    print(f"wrote {ab.table_path()} ({ab.machine_key(device)})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _tuning_parser(sub, name: str, help: str, steps: int):
    p = sub.add_parser(name, help=help)
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--prompts", default=None, help="calibration prompts, one per line (default: digit prompts)")
    p.add_argument("--device", default=None)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description="Fast FLUX.1 / SD3 inference")
    parser.add_argument("--version", action="version", version=f"fastflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="make images from a prompt (--image: image-to-image, Kontext: edit)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (or -p)")
    p.add_argument("-p", "--prompt", dest="prompt_opt", default=None, help="the prompt")
    p.add_argument(
        "-o",
        "--output",
        default="fastflow.png",
        help="image path (.png, .jpg, .webp) or a folder; never overwritten (numbered instead)",
    )
    p.add_argument("--model", default=None, help="pipeline folder or transformer file (default: the embedded model)")
    p.add_argument("--variant", default=None, help="e.g. flux-kontext-dev, sd3.5-large-turbo")
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
    p.add_argument(
        "--from",
        dest="from_image",
        default=None,
        help="re-run a fastflow image: its prompt, seed and settings fill what the command line leaves unset",
    )
    p.add_argument("--sampler", default=None, choices=["euler", "euler_ancestral", "heun", "dpmpp_2m"])
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
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
        help="feature caching: fbcache|teacache|taylorseer|dbcache[:THRESHOLD] or a schedule .json (tune-cache)",
    )
    p.add_argument(
        "--quant",
        default=None,
        choices=["fp8", "none"],
        help="fp8: quantize the transformer's linear layers while loading; none: dequantize an FP8 file "
        "(default: as the file is)",
    )
    p.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    p.set_defaults(func=_cmd_generate)

    p = _tuning_parser(sub, "tune-cache", "search caching schedules (Pareto front of quality vs block work)", 28)
    p.add_argument("--budget", type=float, default=0.3, help="least share of block work a schedule computes")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--groups", type=int, default=None, help="block groups per step (default: one per block)")
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default="schedules", help="folder for one JSON per Pareto point")
    p.set_defaults(func=_cmd_tune_cache)

    p = _tuning_parser(sub, "tune-steps", "search k step sigmas that follow a fine-step trajectory", 4)
    p.add_argument("--fine", type=int, default=64, help="steps of the reference trajectory")
    p.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="skip the coordinate descent on whole-run quality (FD-digits, or PSNR to the fine run)",
    )
    p.add_argument("-o", "--out", default=None, help="write {sigmas: [...]} here")
    p.set_defaults(func=_cmd_tune_steps)

    p = sub.add_parser("quantize", help="write an FP8 copy of a transformer checkpoint (loads back bit-identically)")
    p.add_argument("input", help="a transformer .safetensors file or diffusers folder")
    p.add_argument("output", help="the .safetensors file to write (never overwritten)")
    p.add_argument("--format", default="fp8", choices=["fp8"], help="fp8: e4m3 weights with fp32 scales")
    p.add_argument("--weight", default="per-channel", choices=["per-channel", "per-tensor"], help="weight scales")
    p.add_argument(
        "--keep",
        default=None,
        help="layer groups kept in --dtype, comma-separated: embedders, final, modulation, or none "
        "(default: embedders,final)",
    )
    p.add_argument("--variant", default=None, help="resolve variants the keys cannot tell apart")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the layers kept")
    p.add_argument("--debug", action="store_true", help="print the traceback of unexpected errors")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("info", help="describe a checkpoint (family, variant, dtype, size) from its header")
    p.add_argument("path", help="a .safetensors file or a diffusers folder")
    p.add_argument("--variant", default=None, help="resolve variants the keys cannot tell apart")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("smoke", help="save, load and run a tiny random-weight FLUX model")
    p.add_argument("--variant", default="flux-tiny-dev")
    p.add_argument("-H", "--height", type=int, default=256)
    p.add_argument("-W", "--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_smoke)

    p = sub.add_parser("tune", help="time every attention implementation on this GPU and keep the fastest")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated of: flux, sd3.5-large, sd3.5-medium attn2 (default: all)",
    )
    p.add_argument("--device", default=None, help="cuda (default) or cuda:N")
    p.add_argument("--json", default=None, help="also write the timing rows here")
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("doctor", help="report torch / triton / GPU and which kernels will run")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on bad input (one line), 130 on Ctrl-C, 1 on a fastflow bug (one
    line asking for a report; the traceback with --debug)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastflowError as e:
        print("fastflow: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fastflow doctor | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except Exception as e:  # a bug: one line, the traceback on request
        if getattr(args, "debug", False):
            traceback.print_exc()
        message = " ".join(str(e).split())[:300]
        print(
            f"fastflow: internal error: {type(e).__name__}: {message}. This is a fastflow bug: please report it "
            "with the command you ran"
            + ("" if getattr(args, "debug", False) else " and the output of the same command with --debug"),
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
