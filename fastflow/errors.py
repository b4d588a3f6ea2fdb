"""Every error fastflow raises on bad user input, in one place, and the argument checks that more
than one room makes (a guidance-type scale), so that every room can import them.

Each error names the file (where there is one) and says what to do. All derive from
:class:`FastflowError`; checkpoint problems derive from :class:`CheckpointError` (also a
``ValueError``), so ``except ValueError`` keeps working for callers that do not know our types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path


class FastflowError(Exception):
    """Base class of every fastflow error."""


class CheckpointError(FastflowError, ValueError):
    """A checkpoint file or folder cannot be used. ``path`` is the offending file or folder."""

    def __init__(self, path: str | Path | None, problem: str, fix: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}. {fix}")


class TruncatedFileError(CheckpointError):
    """The file is shorter than its header says (an interrupted download or copy)."""


class HeaderError(CheckpointError):
    """The safetensors header is not valid JSON, too large, or malformed."""


class TensorLayoutError(CheckpointError):
    """Tensor data offsets overlap, leave gaps, run past the end, or disagree with shape/dtype."""


class UnsupportedDtypeError(CheckpointError):
    """A tensor's dtype is not one fastflow can read."""


class PickleRefusedError(CheckpointError):
    """A pickle-based checkpoint (.ckpt/.pt/.pth/.bin): never loaded, it can run arbitrary code."""


class UnsafePathError(CheckpointError):
    """An index entry or a symlink points outside the model folder."""


class NotARegularFileError(CheckpointError):
    """The path is a directory, FIFO, device or socket where a file was expected."""


class TooLargeError(CheckpointError):
    """A header, JSON file or config asks for more work or memory than any real model needs."""


class LfsPointerError(CheckpointError):
    """The file is a Git LFS pointer, not the weights."""


class FamilyMismatchError(CheckpointError):
    """The checkpoint belongs to another model family (or is not a transformer at all)."""


class AmbiguousVariantError(CheckpointError):
    """The keys fit several variants (e.g. FLUX.1-dev and Kontext-dev); ``variant=`` is needed."""


class UnknownConfigError(CheckpointError):
    """The tensor shapes fit no registered config."""


class VariantMismatchError(CheckpointError):
    """The requested ``variant=`` does not fit the checkpoint's tensors."""


def _listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f", ... ({more} more)" if more > 0 else "")


class MissingKeysError(CheckpointError):
    """Tensors the model needs are absent (never silently left at random init)."""

    def __init__(self, path, missing: Iterable[str], fix: str):
        self.missing = sorted(missing)
        super().__init__(path, f"{len(self.missing)} tensor(s) missing: {_listing(self.missing)}", fix)


class UnexpectedKeysError(CheckpointError):
    """Tensors that belong to no known component."""

    def __init__(self, path, unexpected: Iterable[str], fix: str):
        self.unexpected = sorted(unexpected)
        super().__init__(path, f"{len(self.unexpected)} unexpected tensor(s): {_listing(self.unexpected)}", fix)


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs from what the config needs."""

    def __init__(self, path, mismatches: dict[str, tuple[tuple, tuple]], fix: str):
        self.mismatches = dict(sorted(mismatches.items()))
        items = [f"{k}: file {list(got)} vs expected {list(want)}" for k, (got, want) in self.mismatches.items()]
        shown = "; ".join(items[:8]) + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else "")
        super().__init__(path, f"{len(items)} tensor shape(s) do not match the config: {shown}", fix)


class InvalidScaleError(CheckpointError):
    """An FP8 scale tensor is NaN, Inf, zero, negative, of the wrong shape or dtype, or belongs to
    a weight that is not FP8."""


class NonFiniteWeightsError(CheckpointError):
    """A weight tensor holds NaN or inf values (or FP8 NaN / inf codes)."""


class LoraError(CheckpointError):
    """A LoRA file that does not fit the model: a rank or shape mismatch, missing up / down
    halves, or no key that names a layer of this model."""


class InputError(FastflowError, ValueError):
    """A bad argument to a model, op or pipeline call (shape, size, dtype)."""


class UnsafeCacheError(InputError):
    """fastflow's cache folder is not safely the user's own (another owner, writable by group or
    others, not a folder): its entries could have been planted, so it is never used."""


class ArgumentError(InputError, TypeError):
    """A call with an argument the function does not take (a mistyped keyword, too many positional
    ones). Also a ``TypeError``, as Python's own binding error, so ``except TypeError`` keeps working."""


class ParallelError(InputError):
    """A multi-process (torch.distributed) setting that cannot run: sizes that do not match the world,
    a model or feature that cannot be split this way, ranks that disagree."""


class UnknownModelError(FastflowError, KeyError):
    """A config or variant name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


class MissingComponentError(FastflowError, ValueError):
    """A model folder lacks a component the pipeline needs (a VAE, a text encoder, ...)."""


class OutputError(FastflowError):
    """An output path cannot be written (missing permissions, a folder given as a file name, ...)."""


class NumericalError(FastflowError, FloatingPointError):
    """NaN or Inf appeared during generation (typically fp16 overflow): never a silent black image."""


class GenerationInterrupted(FastflowError):
    """Generation was interrupted (``pipeline.interrupt()`` or a callback); ``latents`` holds the
    state after the last finished step."""

    def __init__(self, message: str, latents=None, step: int | None = None):
        super().__init__(message)
        self.latents = latents
        self.step = step


def plain_number(value):
    """``value`` as a Python int / float where it is a numpy integer or float scalar, a 0-d numpy
    array or a 0-d torch tensor of such a dtype (what numpy and torch users pass); anything else
    unchanged (a numpy bool stays one, so integer checks still refuse it)."""
    if isinstance(value, (int, float)) or getattr(value, "ndim", None) != 0 or not hasattr(value, "item"):
        return value
    item = value.item()
    return item if isinstance(item, (int, float)) and not isinstance(item, bool) else value


def check_scale(value, name: str) -> float:
    """A guidance-type scale: a finite number >= 0 (NaN or negative would silently turn guidance off)."""
    value = plain_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)
