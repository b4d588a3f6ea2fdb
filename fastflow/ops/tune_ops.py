"""``fastflow tune`` for every op with a kernel (attention has its own: :mod:`.attention_backends`).

For each op, each kernel backend it has and that this installation can run (Triton, CUDA C++) is
run on the op's timed cases (:mod:`.tune_inputs`), checked against the op's reference, and timed
against the reference under ``torch.compile`` on the same inputs. A kernel wins where its summed
time is below the compiled reference's on the cases it takes (``speedup`` > 1); one that errs, is
wrong, takes none of the cases or is slower is recorded with the reason and never dispatched on
this GPU (:mod:`.kernel_gate`, read by the "kernels" backend of :mod:`._registry`).

The timing is injectable: ``timer(fn, label) -> ms`` (label ``"<op>/<backend>"`` or
``"<op>/compiled-reference"``), so the choice is tested with a fake timer and no GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..errors import InputError
from . import _registry, kernel_gate, tune_table
from .tune_inputs import Case
from .tune_inputs import cases as default_cases

Timer = Callable[[Callable[[], object], str], float]
SKIP = ("attention",)  # tuned by attention_backends.tune, into attention.json
TOLERANCE = {torch.float8_e4m3fn: 0.1, torch.float8_e5m2: 0.2}  # relative L2 error; 2e-2 for the rest


def default_timer(fn: Callable[[], object], label: str) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def check_close(out, want, where: str) -> None:
    """Raise ArithmeticError unless ``out`` matches the reference's ``want`` (tensor or tuple):
    same shapes and dtypes, the same non-finite values, relative L2 error within TOLERANCE."""
    outs, wants = (out, want) if isinstance(want, (tuple, list)) else ((out,), (want,))
    if len(outs) != len(wants):
        raise ArithmeticError(f"{where}: {len(outs)} outputs, the reference has {len(wants)}")
    for i, (a, b) in enumerate(zip(outs, wants, strict=True)):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            got = f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else type(a).__name__
            raise ArithmeticError(f"{where}: output {i} is {got}, the reference's {tuple(b.shape)} {b.dtype}")
        fa, fb = a.double(), b.double()
        finite = fb.isfinite()
        if not torch.equal(fa.isfinite(), finite) or not torch.equal(
            fa[~finite].nan_to_num(), fb[~finite].nan_to_num()
        ):
            raise ArithmeticError(f"{where}: output {i} has non-finite values where the reference does not")
        err = (fa[finite] - fb[finite]).norm() / fb[finite].norm().clamp_min(1e-30)
        tol = TOLERANCE.get(b.dtype, 2e-2)
        if not err <= tol:
            raise ArithmeticError(f"{where}: output {i} relative error {err.item():.3g} > {tol:g}")


def _candidates(opdef: _registry.OpDef) -> list[str]:
    return [b for b in _registry.KERNEL_BACKENDS if b in opdef.impls and _registry._available(b)]


def tune_op(opdef: _registry.OpDef, op_cases: list[Case], device: torch.device, timer: Timer, compile=torch.compile):
    """One op: (its table entry, its rows). Rows: one per (case, candidate or the reference)."""
    compiled = compile(opdef.reference)
    candidates = _candidates(opdef)
    kernel_ms = dict.fromkeys(candidates, 0.0)
    baseline_ms = dict.fromkeys(candidates, 0.0)  # the compiled reference on the cases each kernel took
    why: dict[str, str] = {}
    rows, reference_total = [], 0.0
    for case in op_cases:
        args = case.make(device)
        want = opdef.reference(*args)
        label = f"{opdef.name}/compiled-reference"
        ref_ms = timer(functools.partial(compiled, *args), label)
        reference_total += ref_ms
        rows.append({"op": opdef.name, "case": case.name, "backend": "compiled-reference", "ms": ref_ms})
        for backend in candidates:
            row = {"op": opdef.name, "case": case.name, "backend": backend}
            rows.append(row)
            if backend in why:
                row["error"] = "failed at an earlier case"
                continue
            try:
                fn = opdef.impl(backend)
                out = fn(*args)
                if out is NotImplemented:  # dispatch would run the reference here: nothing to gain or lose
                    row["error"] = "does not take these inputs"
                    continue
                check_close(out, want, f"{opdef.name} {backend} {case.name}")
                ms = timer(functools.partial(fn, *args), f"{opdef.name}/{backend}")
                if not (tune_table.finite_number(ms) and ms > 0):
                    raise ArithmeticError(f"the timer gave {ms!r} ms")
            except Exception as e:  # a kernel that fails or is wrong here never wins
                why[backend] = row["error"] = tune_table.short_error(e)
                continue
            row.update(ms=ms, speedup=ref_ms / ms)
            kernel_ms[backend] += ms
            baseline_ms[backend] += ref_ms
    results: dict[str, float | str] = {}
    for backend in candidates:
        if backend in why:
            results[backend] = why[backend]
        elif kernel_ms[backend] == 0.0:
            results[backend] = "took none of the timed inputs"
        else:
            speedup = baseline_ms[backend] / kernel_ms[backend]
            results[backend] = speedup if speedup > 1.0 else f"loses to the compiled reference: {speedup:.3g}x"
    entry = {"backend": "reference", "speedup": 1.0, "reference_ms": reference_total, "candidates": results}
    won = kernel_gate.winners(entry)
    if won:
        entry.update(backend=won[0], speedup=results[won[0]])
    for row in rows:
        row["chosen"] = row["backend"] == entry["backend"] or (
            entry["backend"] == "reference" and row["backend"] == "compiled-reference"
        )
    return entry, rows


def tune(
    device: torch.device | str = "cuda",
    ops: Iterable[str] | None = None,
    cases: dict[str, list[Case]] | None = None,
    timer: Timer | None = None,
    path: Path | None = None,
    compile=torch.compile,
) -> list[dict]:
    """Time every kernel of ``ops`` (default: every op with a case and an available kernel) on
    ``device`` and store, per op, which kernels beat the compiled reference (``kernels.json``).
    Returns the timing rows. Ops not tuned now keep their entries from an earlier run."""
    device = torch.device(device)
    if device.type != "cuda" and timer is None:
        raise InputError("fastflow tune measures kernels on a CUDA GPU; none is visible to torch")
    cases = default_cases() if cases is None else cases
    names = list(ops) if ops is not None else [n for n in sorted(_registry.OPS) if n in cases and n not in SKIP]
    unknown = [n for n in names if n not in _registry.OPS or n not in cases or n in SKIP]
    if unknown:
        choices = sorted(n for n in cases if n in _registry.OPS and n not in SKIP)
        raise InputError(f"no kernel timing for ops {unknown}; choose from {choices}")
    path = path or kernel_gate.table_path()
    table = kernel_gate.read_table(path, strict=True)  # refuses an unsafe folder before timing anything
    found, rows = {}, []
    for name in names:
        opdef = _registry.OPS[name]
        if not _candidates(opdef):
            rows.append({"op": name, "case": "-", "backend": "-", "error": "no kernel can run here", "chosen": False})
            continue
        found[name], op_rows = tune_op(opdef, cases[name], device, timer or default_timer, compile)
        rows += op_rows
    machine = tune_table.machine_key(device)
    table[machine] = {**table.get(machine, {}), **found}
    tune_table.write(path, table)
    kernel_gate.forget()
    return rows
