"""One table of fastflow ops: each op is declared once with :func:`defop`, which creates the
``fastflow::<name>`` custom op (body = the plain-torch reference), registers its fake and its GPU
kernel, and returns the call-time wrapper that models use.

Backends, read at call time (:func:`set_backend` / :func:`use_backend`):

* ``"kernels"`` (default): call the custom op; the PyTorch dispatcher runs the registered GPU
  kernel for CUDA tensors and the reference body everywhere else. The kernel is the first
  available of :data:`KERNEL_BACKENDS` that the op has, unless ``fastflow tune`` timed the op on
  this GPU (:mod:`.kernel_gate`): then only the kernels that beat the reference under
  torch.compile there, fastest first, and the reference where none did. Eager calls on plain CPU
  tensors skip the dispatcher and run the reference body directly (the same function; see :func:`_plain_cpu`).
* ``"reference"``: call the plain-torch reference directly (tests, benchmarks, debugging).
* a named kernel backend (``"triton"``, later ``"cuda_cpp"``): call that implementation directly on
  any device (GPU A/B runs; CPU tensors under ``TRITON_INTERPRET=1`` in the kernel tests); ops
  without an implementation for it run their reference.

An implementation returns ``NotImplemented`` for inputs it cannot take (a head size, an alignment,
a GPU without FP8 conversion): the op then runs its reference. So the kernels (fastflow/kernels,
below this package) never import the references, and the choice is made here, in one place.

Autograd: kernels are inference-only, so whenever grad is enabled and an input requires it the
wrapper takes the reference path, which differentiates like any torch code.

:data:`OPS` is what ``fastflow doctor``, the benches and ``tools/kernel_report.py`` read.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import kernel_gate

KERNEL_BACKENDS = ("triton", "cuda_cpp")  # in order of preference for the "kernels" backend on CUDA
BACKENDS = ("reference", "kernels", *KERNEL_BACKENDS)
_DEVICE_OF_BACKEND = {"triton": "cuda", "cuda_cpp": "cuda"}  # where the dispatcher runs each kind


@functools.cache  # asked on every CUDA op call; the installation does not change while we run
def _available(backend: str) -> bool:
    """Whether a kernel backend can run in this installation (not whether a GPU is present)."""
    if backend == "triton":
        return importlib.util.find_spec("triton") is not None
    if backend == "cuda_cpp":  # the built module, or NVRTC to compile csrc/ at run time
        if importlib.util.find_spec("fastflow._C") is not None:
            return True
        from .nvrtc import library

        try:
            library()
        except Exception:  # InputError: no cuda-python or no libnvrtc here
            return False
        return True
    return False


@dataclass
class OpDef:
    """One fastflow op. ``impls`` maps a kernel backend to ``"module:function"`` (imported on first
    use, so importing fastflow never needs triton) or to a function; the modules named there export
    ``shipped(arch)``, the launches the kernel report compiles and the benches measure."""

    name: str
    reference: Callable
    fake: Callable
    impls: dict[str, str | Callable] = field(default_factory=dict)
    check: Callable | None = None
    kernels: tuple[str, ...] = ()  # Triton modules behind an implementation that lives in ops
    op: object = None  # the torch.library CustomOpDef
    call: Callable | None = None  # the public wrapper
    _resolved: dict[str, Callable] = field(default_factory=dict, repr=False)

    @property
    def qualname(self) -> str:
        return f"fastflow::{self.name}"

    def impl(self, backend: str) -> Callable:
        """The implementation for ``backend``, imported on first use."""
        if backend not in self._resolved:
            spec = self.impls[backend]
            if callable(spec):
                self._resolved[backend] = spec
            else:
                module, _, attr = spec.partition(":")
                self._resolved[backend] = getattr(importlib.import_module(module), attr)
        return self._resolved[backend]

    def run(self, backend: str, args: tuple):
        """``backend``'s implementation on ``args``, or the reference where it returns NotImplemented."""
        out = self.impl(backend)(*args)
        return self.reference(*args) if out is NotImplemented else out

    def kernel_modules(self) -> list[str]:
        """The Triton kernel modules (``shipped(arch)``; the CUDA C++ kernels are csrc/'s): those the
        Triton implementation names, and ``kernels`` where that implementation is in ops (attention's
        choice among backends)."""
        named = {spec.partition(":")[0] for b, spec in self.impls.items() if b == "triton" and isinstance(spec, str)}
        return sorted({m for m in named if m.startswith("fastflow.kernels.")} | set(self.kernels))

    def device_backend(self, device_type: str = "cuda", device: torch.device | None = None) -> str | None:
        """The kernel backend the dispatcher runs for this op on ``device_type`` here, if any: on a
        GPU where ``fastflow tune`` timed the op (``device``, default the current one), only a
        kernel that won there."""
        order = KERNEL_BACKENDS
        if device_type == "cuda":
            tuned = kernel_gate.won(self.name, device)
            order = order if tuned is None else tuned
        for backend in order:
            if backend in self.impls and _DEVICE_OF_BACKEND.get(backend) == device_type and _available(backend):
                return backend
        return None


OPS: dict[str, OpDef] = {}


def kernel_modules() -> list[str]:
    """Every kernel module the declared ops name (what ``tools/kernel_report.py`` compiles)."""
    return sorted({m for opdef in OPS.values() for m in opdef.kernel_modules()})


_backend = "kernels"


def set_backend(name: str) -> None:
    """Select the backend of every fastflow op from now on (see the module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown fastflow op backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select a backend: ``with fastflow.ops.use_backend("reference"): ...``."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _plain_cpu(args) -> bool:
    """Eager calls on plain CPU tensors run the reference body directly: the custom op's CPU
    dispatch would run the same function, after a first call that imports torch._dynamo (1.3 s,
    torch.library wraps every registered body in ``_disable_dynamo``) and a dispatcher round trip
    per call. Traces (torch.compile, export, fake or functional tensors under a dispatch mode)
    still see the op."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN or not a.is_cpu):
            return False
    return True


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _device_of(args, device_type: str) -> torch.device | None:
    """The device of the first ``device_type`` tensor among ``args`` (where a call runs)."""
    return next((a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == device_type), None)


def kernel_would_run(name: str, *tensors: torch.Tensor) -> bool:
    """Whether op ``name`` would run a kernel (not its reference) for these inputs now. For ops
    that compose others (``ops.linear``) and must pick the same path the kernels would."""
    opdef = OPS[name]
    if _backend == "reference" or _needs_grad(tensors):
        return False
    if _backend == "kernels":
        return any(opdef.device_backend(t.device.type, t.device) is not None for t in tensors)
    return _backend in opdef.impls


def defop(
    name: str,
    reference: Callable,
    fake: Callable,
    impls: dict[str, str] | None = None,
    check: Callable | None = None,
    kernels: tuple[str, ...] = (),
) -> Callable:
    """Declare ``fastflow::<name>``: the custom op (schema from ``reference``'s annotations), its
    fake, a CUDA kernel registration that runs the best available backend, and the wrapper.

    The wrapper has ``reference``'s signature and docstring; ``check(*args)`` validates inputs on
    every backend; ``kernels`` names the Triton modules of an implementation that lives in ops.
    Returns the wrapper.
    """
    if name in OPS:
        raise ValueError(f"fastflow op {name!r} is already defined")
    opdef = OpDef(name, reference, fake, dict(impls or {}), check, tuple(kernels))
    unknown = set(opdef.impls) - set(KERNEL_BACKENDS)
    if unknown:
        raise ValueError(f"{name}: unknown kernel backends {sorted(unknown)}; known: {KERNEL_BACKENDS}")
    signature = inspect.signature(reference)
    names = list(signature.parameters)
    defaults = {n: p.default for n, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}

    def positional(args: tuple, kwargs: dict) -> tuple:
        """args as the reference's full positional list (keywords and defaults filled in)."""
        if kwargs or len(args) < len(names):
            try:
                args = args + tuple(kwargs.pop(n) if n in kwargs else defaults[n] for n in names[len(args) :])
            except KeyError as e:
                raise TypeError(f"{name}() missing argument {e.args[0]!r}") from None
            if kwargs:
                raise TypeError(f"{name}() got unexpected arguments {sorted(kwargs)}")
        return args

    op = torch.library.custom_op(opdef.qualname, reference, mutates_args=())
    op.register_fake(lambda *args, **kwargs: fake(*positional(args, dict(kwargs))))

    def device_kernel(device: str):
        def run(*args, **kwargs):
            args = positional(args, dict(kwargs))
            backend = opdef.device_backend(device, _device_of(args, device))
            return opdef.run(backend, args) if backend else reference(*args)

        return run

    for device in sorted({_DEVICE_OF_BACKEND[b] for b in opdef.impls}):
        op.register_kernel(device)(device_kernel(device))
    opdef.op = op

    def call(*args, **kwargs):
        args = positional(args, kwargs)
        if check is not None:
            check(*args)
        if _backend == "reference" or _needs_grad(args):
            return reference(*args)
        if _backend == "kernels":
            return reference(*args) if _plain_cpu(args) else op(*args)
        return opdef.run(_backend, args) if _backend in opdef.impls else reference(*args)

    # a code object of its own per op: torch.compile caches (and counts recompiles) per code object
    call.__code__ = call.__code__.replace(co_name=name)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = reference.__doc__
    call.__signature__ = signature
    call.__module__ = "fastflow.ops"
    opdef.call = call
    OPS[name] = opdef
    return call
