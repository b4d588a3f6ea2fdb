"""The engine: a bounded queue of requests and one worker thread that runs the pipeline.

Requests arrive from the event loop (:meth:`Engine.submit`, never blocking: a full queue is a 429);
the worker takes the oldest one and, within ``batch_window_ms``, every queued request with the
same key (size, steps, guidance, sampler, negative prompt, cache, LoRA set and scales, input image)
up to ``max_batch`` images, and runs them as ONE pipeline call: a list of prompts with one seed per
image. Each image's noise comes from its own seed (pipelines/noise.py), so a served image is the
in-process ``pipe(prompt, seed=s)`` image, batched or not (bit for bit in the PNG; float pixels
can differ in the last bits with the batch size, as a CPU GEMM's do). Torch work never runs on the
event loop. A call that fails is retried one request at a time when it held several, so a bad
request fails alone; nothing a request does stops the worker.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import threading
import time

from ..errors import CheckpointError, FastflowError, GenerationInterrupted, InputError
from .protocol import ApiError, Work
from .ranks import call_message, make_call

log = logging.getLogger("fastflow.serve")
# what the pipeline reports of a call, added to the settings of its requests
USED = ("dtype", "true_cfg_scale", "cache", "strength")


class Job:
    """A request in the engine: its work, its future (on the event loop), its progress events."""

    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop, deadline: float):
        self.work, self.loop, self.deadline = work, loop, deadline
        self.future: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue | None = asyncio.Queue() if work.stream else None
        self.cancelled = False  # the client went away or timed out: skipped if still queued
        self.started = False
        self.submitted = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def progress(self, step: int, steps: int) -> None:
        if self.events is not None:
            self._call(self.events.put_nowait, ("progress", {"step": step, "steps": steps}))

    def resolve(self, result=None, error: ApiError | None = None) -> None:
        def done():
            if not self.future.done():
                if self.cancelled:  # nobody awaits it any more
                    self.future.cancel()
                elif error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)

        self._call(done)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Engine:
    """The queue and the worker. ``prepare(pipe)`` runs on the worker before it is ready (loading,
    compiling, warming); ``apply_loras(scales)`` sets the LoRA scales of a call."""

    def __init__(self, load, max_batch: int, max_queue: int, batch_window_ms: float, metrics, apply_loras=None):
        self.load, self.max_batch, self.max_queue = load, max_batch, max_queue
        self.window = batch_window_ms / 1000.0
        self.metrics, self.apply_loras = metrics, apply_loras
        self.mirror = None  # under torchrun: the channel every call goes to first (serve/ranks.py)
        self.pipe = None
        self.ready = threading.Event()
        self.failed: str | None = None
        self.accepting = True
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._running_jobs: list[Job] = []  # the call running now (tests, introspection)
        self._batch_seconds = 1.0  # running mean of a call's wall time (Retry-After)
        self._thread = threading.Thread(target=self._run, name="fastflow-serve-worker", daemon=True)

    # --- the event loop's side -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, work: Work, timeout_s: float) -> Job:
        """Queues ``work``: a Job whose future the caller awaits. 503 while loading or shutting
        down, 429 with Retry-After when the queue is full."""
        if not self.accepting:
            raise ApiError(503, "the server is shutting down; retry on another replica", "shutting_down")
        if not self.ready.is_set():
            message = f"the model failed to load: {self.failed}" if self.failed else "the model is still loading"
            raise ApiError(503, message, "loading", {"Retry-After": "5"})
        job = Job(work, asyncio.get_running_loop(), time.monotonic() + timeout_s)
        with self._cond:
            if len(self._queue) >= self.max_queue:
                wait = max(1, round(self._batch_seconds * (1 + len(self._queue) / self.max_batch)))
                raise ApiError(429, f"the queue is full ({self.max_queue} requests); retry after {wait} s",
                               "queue_full", {"Retry-After": str(wait)})  # fmt: skip
            self._queue.append(job)
            self.metrics.queue_depth(len(self._queue))
            self._cond.notify()
        return job

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop_accepting(self) -> None:
        self.accepting = False

    def stop(self, timeout: float | None = None) -> None:
        """Finishes the queued work, then ends the worker."""
        self.accepting = False
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the worker's side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.pipe = self.load()
        except Exception as e:  # reported by /health and every request; the process stays up to say so
            log.exception("fastflow serve: loading the model failed")
            self.failed = f"{type(e).__name__}: {e}"[:500]
            return
        self.ready.set()
        while True:
            batch = self._next_batch()
            if batch is None:
                if self.mirror is not None:  # the other ranks of the group stop too
                    self.mirror.send({"op": "stop"})
                return
            try:
                if batch:
                    self._serve(batch)
            except Exception as e:  # a bug of ours: the batch fails, the worker goes on
                log.exception("fastflow serve: serving a batch failed")
                for job in batch:
                    job.resolve(error=ApiError(500, f"internal error ({type(e).__name__})", "internal_error"))

    def _take_live(self) -> Job | None:
        """The oldest queued job that still has a client (called under the lock)."""
        while self._queue:
            job = self._queue.popleft()
            if job.cancelled:
                job.resolve(error=ApiError(499, "the client went away", "cancelled"))
                continue
            if time.monotonic() > job.deadline:
                job.resolve(error=ApiError(504, "the request timed out in the queue", "timeout"))
                continue
            return job
        return None

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._stop:
                    return None
                self._cond.wait()
            first = self._take_live()
            if first is None:
                self.metrics.queue_depth(len(self._queue))
                return []
            batch, images = [first], first.work.n
            end = time.monotonic() + self.window
            while images < self.max_batch:
                for job in list(self._queue):
                    if images >= self.max_batch:
                        break
                    if job.work.key == first.work.key and images + job.work.n <= self.max_batch and not job.cancelled:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.work.n
                left = end - time.monotonic()
                if images >= self.max_batch or left <= 0 or self._stop:
                    break
                self._cond.wait(left)
            self.metrics.queue_depth(len(self._queue))
            return batch

    def _serve(self, batch: list[Job]) -> None:
        for job in batch:
            job.started = True
        t0 = time.monotonic()
        self._running_jobs = batch
        try:
            results = self._generate(batch)
        except Exception as e:
            if len(batch) > 1 and isinstance(e, FastflowError) and not isinstance(e, GenerationInterrupted):
                for job in batch:  # each alone: only the request at fault fails
                    self._serve([job])
                return
            error = self._error(e)
            for job in batch:
                job.resolve(error=error)
            return
        finally:
            self._running_jobs = []
        seconds = time.monotonic() - t0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.batch(sum(job.work.n for job in batch))
        for job, result in zip(batch, results, strict=True):
            self.metrics.served(job.work.n, time.monotonic() - job.submitted)
            job.resolve(result)

    @staticmethod
    def _error(e: Exception) -> ApiError:
        if isinstance(e, GenerationInterrupted):
            return ApiError(499, "the generation was cancelled: its clients went away", "cancelled")
        if isinstance(e, (InputError, CheckpointError)):  # the request's settings or its LoRA
            return ApiError(422, f"the model refused the request: {e}"[:1000], "unprocessable")
        log.error("fastflow serve: a generation failed", exc_info=e)
        message = f"{type(e).__name__}: {e}" if isinstance(e, FastflowError) else type(e).__name__
        return ApiError(500, f"the generation failed ({message})"[:1000], "generation_failed")

    def _generate(self, batch: list[Job]) -> list[tuple[list[tuple[bytes, int]], dict]]:
        """One pipeline call for the whole batch -> per job ([(png, seed), ...], settings the call used)."""
        work = batch[0].work
        prompts = [job.work.prompt for job in batch for _ in job.work.seeds]
        seeds = [s for job in batch for s in job.work.seeds]
        pipe = self.pipe

        def on_step(i, steps, x):
            for job in batch:
                job.progress(i + 1, steps)
            if self.mirror is None and all(job.cancelled for job in batch):
                pipe.interrupt()  # nobody waits for these images (a group's ranks cannot stop together)

        kwargs = {"height": work.height, "width": work.width, "num_inference_steps": work.steps, "seed": seeds,
                  "sampler": work.sampler, "cache": work.cache}  # fmt: skip
        if work.negative_prompt is not None:
            kwargs["negative_prompt"] = work.negative_prompt
        if work.guidance is not None:
            kwargs["guidance_scale"] = work.guidance
        if work.image is not None:
            kwargs["image"] = work.image
            if work.mask is not None:
                kwargs["mask_image"] = work.mask
            if work.strength is not None:
                kwargs["strength"] = work.strength
        loras = dict(work.loras)
        if self.mirror is not None:  # every rank of the group makes the same call (serve/ranks.py)
            self.mirror.send(call_message(loras, prompts, kwargs))
        out = make_call(pipe, self.apply_loras, loras, prompts, kwargs, on_step)
        used = {key: out.settings.get(key) for key in USED if key in out.settings}
        images = iter(zip(out.images, out.seeds, strict=True))
        return [([(png_bytes(im), seed) for im, seed in (next(images) for _ in job.work.seeds)], used) for job in batch]
