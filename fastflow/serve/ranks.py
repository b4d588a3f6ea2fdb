"""``fastflow serve`` under torchrun: one server per context-parallel group.

``torchrun --nproc-per-node N -m fastflow serve MODEL --parallel ulysses=2,...``: every process
loads the model and splits it (``pipe.enable_parallelism``); rank 0 runs the HTTP server and its
engine, and every pipeline call the engine makes (its LoRA scales, prompts, seeds, settings and
images) is first sent to the other ranks, which make the same call, so that the collectives of a
generation meet. Messages are JSON (images as PNG) on a gloo group of their own: nothing from a
request is unpickled anywhere. Under a group, a running call is never interrupted (the other ranks
could not stop at the same step); a request cancelled while queued is still dropped. SIGTERM (which
torchrun sends to every rank) stops rank 0 gracefully; the others finish every call rank 0 sends and
exit when it says so."""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import signal
import threading

import torch

log = logging.getLogger("fastflow.serve")

# a server idles between requests: the followers' wait for the next call must not time out
_IDLE = datetime.timedelta(days=365)
_IMAGES = ("image", "mask_image")


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(text: str):
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        image.load()
        return image.copy()


class Channel:
    """Rank 0 -> every rank: JSON messages broadcast on a gloo group (collective: every rank of the
    world creates it, in the same order)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.new_group(backend="gloo", timeout=_IDLE)
        self.rank = dist.get_rank()
        self.lock = threading.Lock()

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        with self.lock:
            self.dist.broadcast(torch.tensor([len(data)], dtype=torch.int64), 0, group=self.group)
            self.dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def receive(self) -> dict:
        size = torch.zeros(1, dtype=torch.int64)
        self.dist.broadcast(size, 0, group=self.group)
        data = torch.empty(int(size), dtype=torch.uint8)
        self.dist.broadcast(data, 0, group=self.group)
        return json.loads(bytes(data.numpy()))


def call_message(loras: dict, prompts: list, kwargs: dict) -> dict:
    """A pipeline call as JSON: images as PNG, everything else as given (strings, numbers, lists)."""
    kw = {k: (_png(v) if k in _IMAGES else v) for k, v in kwargs.items()}
    return {"op": "call", "loras": loras, "prompts": prompts, "kwargs": kw}


def read_call(message: dict) -> tuple[dict, list, dict]:
    """``call_message``'s inverse: (LoRA scales, prompts, keyword arguments with images decoded)."""
    kwargs = {k: (_image(v) if k in _IMAGES else v) for k, v in message["kwargs"].items()}
    return message["loras"], message["prompts"], kwargs


def make_call(pipe, apply_loras, loras: dict, prompts: list, kwargs: dict, callback=None):
    """One pipeline call with its LoRA scales (rank 0's engine, the followers and single servers alike)."""
    if apply_loras is not None:
        apply_loras(pipe, loras)
    return pipe(prompts, callback=callback, progress=False, **kwargs)


def parallel_sizes(text: str | None):
    """``--parallel``: the sizes, checked before loading (None: one process)."""
    from ..errors import InputError
    from ..parallel import ParallelConfig, launched

    if text is None:
        if launched():
            raise InputError(
                "fastflow serve runs under torchrun here (WORLD_SIZE > 1) without --parallel: pass the split, "
                "e.g. --parallel ulysses=2 (one server per group), or run one server per GPU instead"
            )
        return None
    sizes = ParallelConfig.parse(text)
    if not launched():
        raise InputError(
            f"--parallel {text} needs several processes: `torchrun --nproc-per-node {sizes.world_size} "
            f"-m fastflow serve MODEL --parallel {text}`"
        )
    if sizes.data > 1:
        raise InputError("--parallel data=N would make other images on other ranks: serve one replica per GPU")
    return sizes


def split(pipe, sizes) -> Channel:
    """Every rank: the pipeline split over the group, then the message channel."""
    pipe.enable_parallelism(**vars(sizes))
    return Channel()


def follow(config, sizes) -> int:
    """Ranks other than 0: load, split and prepare as rank 0 does, then make every call it sends
    until it says stop. Returns the exit status."""
    from ..errors import FastflowError
    from .loras import LoraRegistry
    from .model import load_pipeline, prepare

    signal.signal(signal.SIGTERM, lambda *_: log.info("fastflow serve: SIGTERM; waiting for rank 0 to stop"))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = load_pipeline(config)
    channel = split(pipe, sizes)
    loras = LoraRegistry(config.loras, config.lora_dir)
    prepare(pipe, config, loras)
    while True:
        message = channel.receive()
        if message.get("op") == "stop":
            channel.dist.destroy_process_group()
            return 0
        try:
            make_call(pipe, loras.apply, *read_call(message))
        except FastflowError as e:  # rank 0 meets the same refusal and answers it
            log.info("fastflow serve: a call was refused (%s)", e)
