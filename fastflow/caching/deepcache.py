"""DeepCache (Ma et al., CVPR 2024, arXiv 2312.00858) for the SDXL UNet and the SVD VideoUNet.

A UNet's deep features change slowly between denoising steps. On a *full* step the whole UNet runs
and the feature that enters the decoder at skip branch ``B`` (the output of ``output_blocks[n - 2 - B]``,
or of ``middle_block`` for the deepest branch: what ``output_blocks[n - 1 - B]`` concatenates with
skip ``B``) is kept. On the other steps only the shallow path runs: ``input_blocks[0 .. B]`` (their
outputs are skips ``0 .. B``), then ``output_blocks[n - 1 - B ..]`` starting from the kept feature.

Which steps are full depends only on the step index and the step count (never on data), so every
rank of a split generation (fastflow.parallel: the UNet's CFG / batch rows) takes the same decision
without communicating; each rank keeps the feature of its own rows.

Schedules (``T`` steps, interval ``N``):

* ``uniform``: step ``i`` is full when ``i % N == 0``.
* ``nonuniform`` (the paper's "non-uniform 1:N"): the same number of full steps ``K = ceil(T / N)``,
  placed densest around a center step ``c = round(center * (T - 1))`` and sparser towards both ends:
  ``full = {0} U {c + sign(u_k) |u_k|^p : u_k = linspace(-c^(1/p), (T - 1 - c)^(1/p), K)}`` (rounded
  towards zero), with the power ``p`` lowered from ``power`` in steps of 0.02 until the set has ``K``
  distinct steps (``p`` = 1 is the uniform spread); the set always holds step 0.

A *block* (``out.stats``) is one entry of ``input_blocks``, ``middle_block`` or ``output_blocks``: a
full forward counts ``2 n + 1`` (``n`` input blocks), a shallow one ``2 (B + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .policies import POLICIES
from .ras import RAS, check_family
from .ras import resolve_cache as resolve_token_policy
from .runner import CacheRunner, CacheStats, adapter_for

SCHEDULES = ("uniform", "nonuniform")
UNET_POLICIES = ("deepcache",)


def _count(value, label: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"deepcache {label} must be an integer >= {low}, got {value!r}")
    return value


def nonuniform_steps(steps: int, interval: int, center: float = 0.3, power: float = 1.4) -> frozenset[int]:
    """The full steps of the non-uniform schedule (module docstring)."""
    k = min(steps, math.ceil(steps / interval))
    if k >= steps:
        return frozenset(range(steps))
    c = round(center * (steps - 1))
    p = power
    while True:
        lo, hi = -(c ** (1 / p)), (steps - 1 - c) ** (1 / p)
        us = [lo + (hi - lo) * j / (k - 1) for j in range(k)] if k > 1 else [lo]
        full = {0} | {min(steps - 1, max(0, c + int(math.copysign(abs(u) ** p, u)))) for u in us}
        if len(full) >= k or p <= 1.0:
            break
        p = max(1.0, p - 0.02)
    return frozenset(sorted(full)[:k] if len(full) > k else full)


class DeepCache:
    """A full UNet pass on the schedule's steps, the shallow path (skip branch ``branch``) reusing
    the last full pass's deep feature on the others. Keeps nothing on itself (the feature lives in
    the generation's memory, one per guidance branch), so one object serves concurrent calls."""

    name = "deepcache"

    def __init__(self, interval: int = 3, branch: int = 0, schedule: str = "uniform", center: float = 0.3,
                 power: float = 1.4):  # fmt: skip
        self.interval = _count(interval, "interval", 1)
        self.branch = _count(branch, "branch", 0)
        if schedule not in SCHEDULES:
            raise InputError(f"deepcache schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        ok = isinstance(center, (int, float)) and not isinstance(center, bool) and 0.0 <= center <= 1.0
        if not ok or not isinstance(power, (int, float)) or isinstance(power, bool) or not 1.0 <= power <= 4.0:
            raise InputError(f"deepcache center must be in [0, 1] and power in [1, 4], got {center!r}, {power!r}")
        self.schedule, self.center, self.power = schedule, float(center), float(power)

    def describe(self) -> str:
        tail = "" if self.schedule == "uniform" else ":nonuniform"
        return f"deepcache:N{self.interval}B{self.branch}{tail}"

    def full_steps(self, steps: int) -> frozenset[int]:
        """The step indices that run the whole UNet (a function of the step count only)."""
        if self.schedule == "uniform":
            return frozenset(range(0, steps, self.interval))
        return nonuniform_steps(steps, self.interval, self.center, self.power)

    def check(self, model) -> None:
        n = len(model.input_blocks)
        if self.branch >= n:
            raise InputError(
                f"deepcache branch {self.branch} is out of range: this {type(model).__name__} has {n} skip "
                f"branches (0 .. {n - 1}; 0 is the shallowest)"
            )

    def forward(self, step, memory: dict) -> DeepFeature:
        """This forward's plan: a :class:`DeepFeature` with the kept feature (shallow) or none (full)."""
        full = step.index in self.full_steps(step.steps) or "feature" not in memory
        return DeepFeature(self.branch, None if full else memory["feature"])


@dataclass
class DeepFeature:
    """What a UNet forward takes as ``deep_cache=``: the skip ``branch`` and the kept deep
    ``feature`` (None: run the whole UNet and store the feature here)."""

    branch: int
    feature: torch.Tensor | None = None


def is_unet(model) -> bool:
    from ..models.unet import UNet
    from ..models.unet_video import VideoUNet

    return isinstance(model, (UNet, VideoUNet))


class DeepCacheRunner:
    """Per generation: the DeepCache policy, the kept feature per guidance branch, the stats."""

    def __init__(self, policy: DeepCache, model, stats: CacheStats):
        policy.check(model)
        self.policy, self.model, self.stats, self.memory = policy, model, stats, {}

    def __call__(self, step, args, kwargs) -> torch.Tensor:
        memory = self.memory.setdefault(step.branch, {})
        deep = self.policy.forward(step, memory)
        total = self.model.num_blocks
        self.stats.transformer_calls += 1
        self.stats.blocks_total += total
        self.stats.blocks_computed += total if deep.feature is None else 2 * (deep.branch + 1)
        out = self.model(*args, **kwargs, deep_cache=deep)
        if deep.feature is None:
            raise InputError(f"{type(self.model).__name__}.forward did not keep a deep feature for deepcache")
        memory["feature"] = deep.feature
        return out


def family_policies(model) -> tuple[str, ...]:
    """The cache= names a model's pipelines run."""
    if is_unet(model):
        return UNET_POLICIES
    if adapter_for(model) is not None:
        return (*POLICIES, "ras", "a tune-cache schedule .json")
    return ()


def _parse(text: str) -> tuple[int, int | None]:
    parts = text.split(":")[1:]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 2 or len(values) != len(parts):
        raise InputError(f"cache {text!r}: write deepcache, deepcache:INTERVAL or deepcache:INTERVAL:BRANCH")
    return values[0], values[1] if len(values) > 1 else None


def resolve_for_model(cache, threshold, interval, branch, config, model, ras_ratio=None):
    """``cache=`` (and its numbers: DeepCache's interval / branch, RAS's ratio) of a call -> (policy,
    runner class), or (None, None); refuses a policy the model's family does not run, naming the ones
    it does."""
    family = f"{getattr(config, 'family', '?')} ({type(model).__name__})"
    runs = family_policies(model)
    runs_text = ", ".join(runs) if runs else "none"
    deep_named = cache == "deepcache" or isinstance(cache, DeepCache)
    deep_named = deep_named or (isinstance(cache, str) and cache.startswith("deepcache:"))
    if (interval is not None or branch is not None) and not deep_named:
        raise InputError(
            f"cache_interval / cache_branch are DeepCache's (cache='deepcache'); {family} cache policies: {runs_text}"
        )
    if not is_unet(model):
        if deep_named:
            raise InputError(f"deepcache is for UNets (SDXL, SVD); {family} cache policies: {runs_text}")
        policy = resolve_token_policy(cache, threshold, ras_ratio, config)
        check_family(policy, model, config)
        if policy is not None and adapter_for(model) is None:
            raise InputError(f"{type(model).__name__} has no block loop fastflow.caching can drive")
        return policy, None if policy is None else CacheRunner
    if ras_ratio is not None or cache == "ras" or isinstance(cache, RAS):
        raise InputError(
            f"RAS (cache='ras', ras_ratio=) selects tokens of FLUX and SD3 transformers; the "
            f"{getattr(config, 'family', '?')} family has no token loop. Its cache policies: {runs_text}"
        )
    if cache is None:
        if threshold is not None:
            raise InputError(f"cache_threshold needs cache=; {family} cache policies: {runs_text}")
        return None, None
    if not deep_named:
        raise InputError(f"{family} cannot run cache={cache!r:.100}; its cache policies: {runs_text}")
    if threshold is not None:
        raise InputError("deepcache has no threshold: pass cache_interval= and cache_branch=")
    if isinstance(cache, DeepCache):
        if interval is not None or branch is not None:
            raise InputError("pass cache_interval / cache_branch or a DeepCache object, not both")
        return cache, DeepCacheRunner
    if cache != "deepcache":
        if interval is not None or branch is not None:
            raise InputError(f"cache={cache!r} already gives the numbers: drop cache_interval / cache_branch")
        interval, branch = _parse(cache)
    defaults = DeepCache()
    policy = DeepCache(
        defaults.interval if interval is None else interval, defaults.branch if branch is None else branch
    )
    return policy, DeepCacheRunner
