"""The class every family pipeline subclasses: its state (modules, defaults from the model config,
progress bar, interruption, prompt cache) and, from the mixins, what every pipeline shares:

- :mod:`.template`: the prepare -> denoise -> decode template and the one door to the transformer;
- :mod:`.settings`: size, steps, sigmas and images-per-call checks, the reported settings;
- :mod:`.prompts`: prompts to text embeddings through the prompt cache;
- :mod:`.noise`: seeds, the start noise, image-to-image's start state;
- :mod:`.lora` and :mod:`.offload`: LoRA, ``pipe.to`` and model CPU offload.
"""

from __future__ import annotations

import collections
import threading

from ..errors import InputError
from .lora import LoraMixin
from .noise import NoiseMixin
from .offload import OffloadMixin
from .prompts import PromptMixin
from .settings import MAX_IMAGES_PER_CALL, SettingsMixin
from .template import TemplateMixin


class BasePipeline(TemplateMixin, SettingsMixin, PromptMixin, NoiseMixin, LoraMixin, OffloadMixin):
    """Common state (modules, defaults from the model config, progress bar, interruption) and the
    prepare -> denoise -> decode template."""

    progress_bar = True
    # CPU threads during a call (pipelines/threads.py): "auto" applies the thread rule (1 for small
    # models, FASTFLOW_NUM_THREADS overrides), an int that count, None leaves torch's setting alone
    num_threads: int | str | None = "auto"

    def __init__(self, transformer, vae, text_encoder=None, default_size: tuple[int, int] | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.config = transformer.config
        sampling = self.config.sampling
        self.defaults = sampling.as_dict()  # per-pipeline copy: callers may adjust it
        self.default_size = tuple(default_size or sampling.size)
        self.view_upscale = sampling.view_upscale  # the CLI's default PNG upscale
        self._running: set[threading.Event] = set()  # one token per running generation
        self._prompt_cache: collections.OrderedDict = collections.OrderedDict()  # see encode_text
        self._prompt_lock = threading.Lock()
        self.max_images_per_call = MAX_IMAGES_PER_CALL

    # multi-process runs: the plan applied by enable_parallelism, and the function that applies one
    # (fastflow.parallel registers it when imported, which ``import fastflow`` does)
    _parallel = None
    parallel_backend = None

    def enable_parallelism(self, ulysses: int = 1, ring: int = 1, cfg: int = 1, data: int = 1):
        """Split every generation over the processes of a torch.distributed run (torchrun): tokens over
        ``ulysses`` x ``ring`` ranks (context parallelism; FLUX and SD3), a forward's batch over ``cfg``
        (the CFG branches) x ``data`` (images) ranks. The sizes multiply to the world size; every rank
        runs the same calls and gets the same images. Returns the pipeline."""
        backend = BasePipeline.parallel_backend
        if backend is None:
            raise InputError("parallelism needs fastflow.parallel (import fastflow, not only fastflow.pipelines)")
        self.disable_parallelism()
        self._parallel = backend(self, ulysses=ulysses, ring=ring, cfg=cfg, data=data)
        return self

    def disable_parallelism(self):
        """Back to one process's computation (the process group stays as the user made it)."""
        if self._parallel is not None:
            self._parallel.remove()
            self._parallel = None
        return self

    def interrupt(self) -> None:
        """Stop the generations running now (each after its current step, raising
        GenerationInterrupted). Each generation has its own token, so a call starting at the same
        moment neither clears this request nor is stopped by it."""
        for token in list(self._running):
            token.set()

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress_bar = not disable
