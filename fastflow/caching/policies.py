"""Cache policies: per forward, which block ranges to compute and which to reuse.

Each policy has ``forward(run, step, memory)``: ``run`` computes block ranges (returning their
residual) or reuses a residual (:class:`~fastflow.caching.runner.BlockRun`); ``step`` is the
:class:`~fastflow.samplers.Step` being evaluated; ``memory`` is this generation's dict for the
step's guidance branch. A policy keeps nothing on itself, so one policy object serves any number
of concurrent generations.

Batch rule: a decision covers the whole batch of a forward; change metrics take the largest
per-image value, so the most-changing image decides (never reusing for an image that needs a
compute).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from pathlib import Path

import torch

from ..errors import InputError, check_scale
from .runner import Residual

# How a change metric is completed across processes: set by fastflow.parallel for a generation split
# over ranks (each holds some images or tokens), so that every rank takes the same decision.
_REDUCER: contextvars.ContextVar = contextvars.ContextVar("fastflow_change_reducer", default=None)


@contextlib.contextmanager
def change_reducer(reduce):
    """Within the context (this thread / task), :func:`relative_change` hands its per-image sums to
    ``reduce(diff_sum [B], scale_sum [B], count) -> worst ratio`` instead of finishing them here."""
    token = _REDUCER.set(reduce)
    try:
        yield
    finally:
        _REDUCER.reset(token)


def relative_change(new: Residual | torch.Tensor, old: Residual | torch.Tensor) -> float:
    """Largest per-image relative L1 change ``mean|new - old| / mean|old|`` (over streams)."""
    if isinstance(new, torch.Tensor):
        new, old = {"t": new}, {"t": old}
    reduce = _REDUCER.get()
    worst = 0.0
    for key, a in new.items():
        b = old[key]
        if a.shape != b.shape:
            return math.inf
        dims = tuple(range(1, a.ndim))
        if reduce is not None:
            count = a[0].numel() if a.shape[0] else 1
            diff = (a.float() - b.float()).abs().sum(dim=dims)
            worst = max(worst, reduce(diff, b.float().abs().sum(dim=dims), count))
            continue
        diff = (a.float() - b.float()).abs().mean(dim=dims)
        scale = b.float().abs().mean(dim=dims).clamp_min(1e-12)
        worst = max(worst, (diff / scale).max().item())
    return worst


def _last_step(step) -> bool:
    return step.index == step.steps - 1


class FBCache:
    """First-Block Cache: always compute block 0; when the relative L1 change of its residual since
    the last full forward is under ``threshold``, reuse the remaining blocks' residual."""

    name = "fbcache"

    def __init__(self, threshold: float = 0.08):
        self.threshold = check_scale(threshold, "fbcache threshold")

    def describe(self) -> str:
        return f"fbcache:{self.threshold:g}"

    def forward(self, run, step, memory) -> None:
        first = run.compute(0, 1)
        rest = memory.get("rest")
        if rest is not None and relative_change(first, memory["first"]) < self.threshold:
            run.reuse(rest)
            return
        memory["rest"], memory["first"] = run.compute(1, run.num_blocks), first


class DBCache:
    """cache-dit's dual-block cache: always compute the first ``front`` and last ``back`` blocks;
    reuse the middle's residual while the front residual changes less than ``threshold``."""

    name = "dbcache"

    def __init__(self, front: int = 1, back: int = 1, threshold: float = 0.08):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (front, back)) or front < 1:
            raise InputError(f"dbcache needs front >= 1 and back >= 0 blocks, got front={front!r}, back={back!r}")
        self.front, self.back = front, back
        self.threshold = check_scale(threshold, "dbcache threshold")

    def describe(self) -> str:
        return f"dbcache:F{self.front}B{self.back}:{self.threshold:g}"

    def forward(self, run, step, memory) -> None:
        n = run.num_blocks
        if self.front + self.back >= n:
            raise InputError(f"dbcache F{self.front}B{self.back} leaves no middle blocks in a {n}-block model")
        front = run.compute(0, self.front)
        middle = memory.get("middle")
        if middle is not None and relative_change(front, memory["front"]) < self.threshold:
            run.reuse(middle)
        else:
            memory["middle"], memory["front"] = run.compute(self.front, n - self.back), front
        run.compute(n - self.back, n)


# TeaCache rescaling polynomials (highest power first): relative L1 change of block 0's modulated
# input -> estimated relative change of the output. FLUX's is TeaCache4FLUX's published fit;
# the embedded model's is fitted by tools/fit_teacache.py.
TEACACHE_COEFFICIENTS = {
    "flux": (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    # tools/fit_teacache.py --seeds 4 (28 steps, 10 digit prompts): fit RMS 0.023
    "fastflow-tiny-digits": (1.78510491e00, -1.49102328e-02),
}


class TeaCache:
    """Accumulate the rescaled relative L1 change of block 0's modulated input; compute every block
    when the sum passes ``threshold`` (and on the first and last step), else reuse the residual of
    all blocks."""

    name = "teacache"

    def __init__(self, threshold: float = 0.25, coefficients=None):
        self.threshold = check_scale(threshold, "teacache threshold")
        self.coefficients = None if coefficients is None else tuple(float(c) for c in coefficients)

    def describe(self) -> str:
        return f"teacache:{self.threshold:g}"

    def for_model(self, config) -> TeaCache:
        """This policy with the model's rescaling polynomial when none was given."""
        if self.coefficients is not None:
            return self
        coefficients = TEACACHE_COEFFICIENTS.get(config.name)
        if coefficients is None:
            coefficients = TEACACHE_COEFFICIENTS["flux"] if config.family == "flux" else (1.0, 0.0)
        return TeaCache(self.threshold, coefficients)

    def rescale(self, change: float) -> float:
        """The estimated output change; never negative (a fit may dip below 0 near 0)."""
        return max(0.0, float(sum(c * change**p for p, c in enumerate(reversed(self.coefficients)))))

    def forward(self, run, step, memory) -> None:
        modulated = run.modulated_input()
        previous, everything = memory.get("modulated"), memory.get("all")
        memory["modulated"] = modulated
        if previous is not None and everything is not None and step.index > 0 and not _last_step(step):
            memory["accumulated"] = memory.get("accumulated", 0.0) + self.rescale(relative_change(modulated, previous))
            if memory["accumulated"] < self.threshold:
                run.reuse(everything)
                return
        memory["all"], memory["accumulated"] = run.compute(0, run.num_blocks), 0.0


class TaylorSeer:
    """Compute every block on every ``interval``-th step (and the first ``warmup`` and the last);
    in between, extrapolate the residual of all blocks from the last ``order + 1`` computed ones
    with Newton divided differences in sigma (a Taylor forecast instead of plain reuse)."""

    name = "taylorseer"

    def __init__(self, order: int = 1, interval: int = 2, warmup: int = 2):
        for label, value, low in (("order", order, 0), ("interval", interval, 1), ("warmup", warmup, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InputError(f"taylorseer {label} must be an integer >= {low}, got {value!r}")
        if order > 2:
            raise InputError(f"taylorseer order must be 0, 1 or 2, got {order}")
        self.order, self.interval, self.warmup = order, interval, warmup

    def describe(self) -> str:
        return f"taylorseer:O{self.order}N{self.interval}"

    def forward(self, run, step, memory) -> None:
        history = memory.setdefault("history", [])
        full = step.index < self.warmup or step.index % self.interval == 0 or _last_step(step) or not history
        if full:
            history.append((float(step), run.compute(0, run.num_blocks)))
            del history[: -(self.order + 1)]
            return
        run.reuse(self.forecast(history, float(step)))

    @staticmethod
    def forecast(history, s: float) -> Residual:
        """Newton interpolation of the residuals through the history's sigmas, evaluated at s."""
        points = [h for h in history if h[0] != s] or history[-1:]
        sigmas = [p[0] for p in points]
        table = [p[1] for p in points]  # divided differences, updated in place
        coefficients = [table[-1]]
        for level in range(1, len(points)):
            table = [
                {k: (table[i + 1][k] - table[i][k]) / (sigmas[i + level] - sigmas[i]) for k in table[i]}
                for i in range(len(table) - 1)
            ]
            coefficients.append(table[-1])
        out = {k: v.clone() for k, v in coefficients[0].items()}
        factor = 1.0
        for level in range(1, len(coefficients)):
            factor *= s - sigmas[-level]
            for k in out:
                out[k] = out[k] + factor * coefficients[level][k]
        return out


SCHEDULE_KIND = "fastflow-cache-schedule"


class Schedule:
    """A static compute mask: ``mask[step][group]`` true = compute that block group at that step,
    false = reuse its residual from the last step that computed it. ``groups``: [start, end)
    block ranges covering the model in order (default: one group per mask column, blocks split
    evenly)."""

    name = "schedule"

    def __init__(self, mask, groups=None, source: str | None = None, info: dict | None = None):
        where = f"cache schedule {source}" if source else "a cache schedule"
        flag = (0, 1)  # bools and the 0 / 1 that to_json writes
        if (
            not isinstance(mask, (list, tuple))
            or not all(isinstance(r, (list, tuple)) for r in mask)
            or not all(type(v) in (bool, int) and v in flag for r in mask for v in r)
        ):
            raise InputError(f"{where}: the mask must be a list of rows of 0 / 1 (one row per step)")
        rows = [[bool(v) for v in row] for row in mask]
        if not rows or len({len(r) for r in rows}) != 1 or not rows[0]:
            raise InputError(f"{where}: the mask must be a non-empty list of equal-length rows")
        if not all(rows[0]):
            raise InputError(f"{where} must compute every block group at step 0")
        self.mask, self.source, self.info = rows, source, dict(info or {})
        if groups is not None:
            pairs = isinstance(groups, (list, tuple)) and all(
                isinstance(g, (list, tuple)) and len(g) == 2 and all(type(v) is int for v in g) and 0 <= g[0] < g[1]
                for g in groups
            )
            if not pairs:
                raise InputError(f"{where}: groups must be a list of [start, end] block ranges, got {groups!r:.200}")
        self.groups = None if groups is None else [tuple(int(v) for v in g) for g in groups]
        if self.groups is not None and len(self.groups) != len(rows[0]):
            raise InputError(f"{where}: {len(rows[0])} mask columns but {len(self.groups)} groups")

    def describe(self) -> str:
        return f"schedule:{Path(self.source).name}" if self.source else f"schedule:{len(self.mask)}x{len(self.mask[0])}"

    @property
    def work(self) -> float:
        """Share of block groups computed (equal-size groups)."""
        return sum(map(sum, self.mask)) / (len(self.mask) * len(self.mask[0]))

    def block_groups(self, num_blocks: int) -> list[tuple[int, int]]:
        if self.groups is not None:
            ranges = self.groups
        else:
            n = len(self.mask[0])
            if n > num_blocks:
                raise InputError(f"the schedule has {n} groups but the model only {num_blocks} blocks")
            bounds = [round(i * num_blocks / n) for i in range(n + 1)]
            ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
        gaps = any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        if ranges[0][0] != 0 or ranges[-1][1] != num_blocks or gaps:
            raise InputError(f"schedule groups {ranges} do not cover blocks 0..{num_blocks} in order")
        return ranges

    def forward(self, run, step, memory) -> None:
        if step.steps != len(self.mask):
            raise InputError(
                f"this cache schedule is for {len(self.mask)} steps; the call runs {step.steps}: "
                "pass num_inference_steps to match, or search a schedule for this step count"
            )
        row = self.mask[step.index]
        for g, (start, end) in enumerate(self.block_groups(run.num_blocks)):
            key = ("group", g)
            if row[g] or key not in memory:
                memory[key] = run.compute(start, end)
            else:
                run.reuse(memory[key])

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        mask = [[int(v) for v in r] for r in self.mask]
        return {"kind": SCHEDULE_KIND, "mask": mask, "groups": self.groups, **self.info}

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        from ..loading.files import read_json

        path = Path(path)
        if not path.is_file():
            raise InputError(f"cache schedule {path} not found")
        data = read_json(path, "cache schedule")
        if not isinstance(data, dict) or data.get("kind") != SCHEDULE_KIND or not isinstance(data.get("mask"), list):
            raise InputError(f"{path} is not a fastflow cache schedule (written by fastflow tune-cache)")
        info = {k: v for k, v in data.items() if k not in ("kind", "mask", "groups")}
        return cls(data["mask"], data.get("groups"), source=str(path), info=info)


POLICIES = {"fbcache": FBCache, "teacache": TeaCache, "taylorseer": TaylorSeer, "dbcache": DBCache}


def resolve_policy(cache, threshold=None, config=None):
    """``cache=`` of a pipeline call: None, a policy name (with ``threshold``), a schedule JSON
    path, or a policy object."""
    if cache is None:
        if threshold is not None:
            raise InputError("cache_threshold needs cache= (one of: " + ", ".join(POLICIES) + ")")
        return None
    if isinstance(cache, str) and cache in POLICIES:
        if cache == "taylorseer":
            if threshold is not None:
                raise InputError("taylorseer has no threshold: pass TaylorSeer(order=, interval=) instead")
            policy = TaylorSeer()
        else:
            policy = POLICIES[cache]() if threshold is None else POLICIES[cache](threshold=threshold)
    elif isinstance(cache, (str, os.PathLike)) and str(cache).endswith(".json"):
        policy = Schedule.load(cache)
    elif hasattr(cache, "forward") and hasattr(cache, "describe"):
        policy = cache
    else:
        raise InputError(
            f"cache must be None, one of {', '.join(POLICIES)}, a schedule .json from fastflow tune-cache, "
            f"or a policy object; got {cache!r}"
        )
    if isinstance(policy, TeaCache) and config is not None:
        policy = policy.for_model(config)
    return policy
