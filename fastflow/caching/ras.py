"""Region-adaptive sampling (RAS, Liu et al. 2025, arXiv 2502.10389) for FLUX and SD3.

At a RAS step only the ``ratio`` share of image tokens whose output is predicted to change most go
through the transformer (text tokens, and FLUX Kontext's context-image tokens, always do); every
other image token keeps its last computed output (velocity). The prediction is the paper's: per
token, the standard deviation over latent channels of the last output, averaged over the token's
patch pixels, times ``exp(starvation * times_dropped)`` so a token left out often comes back. The
first ``warmup`` steps, every ``full_every``-th step (the paper's "error-reset" steps) and the last
step run every token.

Equivalences and choices (docs/ras.md):

* Selected tokens attend to each other and to the text, not to the dropped tokens (the paper also
  feeds the dropped tokens' cached K / V to the attention; fastflow does not: shapes stay static and
  the sequence-parallel attention is unchanged). FLUX's RoPE tables are built from the selected
  tokens' position ids; SD3's position embedding is added before the selection.
* Every rank of a context-parallel run sees the whole output (the sharded ``final`` gathers it), so
  the metric, the top-k and the selection are the same everywhere without a collective.
* ``k = max(1, round(ratio * N))`` is fixed for a ratio and a size: shapes are static under compile.
* ``blocks=``: a block policy (FBCache, DBCache or a tune-cache Schedule) runs inside each forward on
  the tokens RAS keeps; its cached residuals are stored for all image tokens, read at the kept
  tokens and written back at them (a token's residual is the one of the last step that computed it).
* Work: a forward on ``T`` text and ``k`` of ``N`` image tokens counts each block it computes as
  ``(T + k) / (T + N)`` of a block (tokens through the blocks; attention's quadratic part is not
  weighted separately).
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from .policies import DBCache, FBCache, Schedule, resolve_policy
from .runner import BlockRun

# the cache policies each family has (named in the refusal of RAS for a family without a token loop)
FAMILY_POLICIES = {
    "flux": "fbcache, teacache, taylorseer, dbcache, a tune-cache schedule, ras",
    "sd3": "fbcache, teacache, taylorseer, dbcache, a tune-cache schedule, ras",
    "sdxl": "deepcache",
    "svd": "deepcache",
}
BLOCK_POLICIES = (FBCache, DBCache, Schedule)


def _whole(value, low: int, label: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"ras {label} must be an integer >= {low}, got {value!r}")
    return value


def check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
        raise InputError(f"ras_ratio must be a number in (0, 1] (the share of image tokens computed), got {ratio!r}")
    return float(ratio)


class RAS:
    """Region-adaptive sampling: ``ratio`` of the image tokens per step (1 = every token, the
    uncached result bit for bit), ``warmup`` full steps first, a full step every ``full_every``
    steps (0: none), the last step full; ``starvation`` weighs how often a token was dropped;
    ``blocks``: a block policy run inside each forward (FBCache, DBCache, Schedule)."""

    name = "ras"
    selects_tokens = True

    def __init__(self, ratio: float = 0.5, warmup: int = 4, full_every: int = 0, starvation: float = 0.1,
                 blocks=None):  # fmt: skip
        self.ratio = check_ratio(ratio)
        self.warmup = _whole(warmup, 1, "warmup")
        self.full_every = _whole(full_every, 0, "full_every")
        if isinstance(starvation, bool) or not isinstance(starvation, (int, float)) or not math.isfinite(starvation):
            raise InputError(f"ras starvation must be a finite number, got {starvation!r}")
        if starvation < 0:
            raise InputError(f"ras starvation must be >= 0, got {starvation!r}")
        self.starvation = float(starvation)
        if blocks is not None and not isinstance(blocks, BLOCK_POLICIES):
            raise InputError(
                f"RAS composes with fbcache, dbcache and tune-cache schedules, not {getattr(blocks, 'name', blocks)!r}"
                " (teacache and taylorseer keep whole-model state RAS cannot split by token)"
            )
        self.blocks = blocks

    def describe(self) -> str:
        inner = f"+{self.blocks.describe()}" if self.blocks is not None else ""
        return f"ras:{self.ratio:g}W{self.warmup}F{self.full_every}{inner}"

    # -- decisions ---------------------------------------------------------------------------
    def tokens(self, n: int) -> int:
        return max(1, min(n, round(self.ratio * n)))

    def is_full(self, step, n: int) -> bool:
        return (
            self.tokens(n) >= n
            or step.index < self.warmup
            or step.index == step.steps - 1
            or (self.full_every > 0 and (step.index - self.warmup) % self.full_every == self.full_every - 1)
        )

    def select(self, previous: torch.Tensor, dropped: torch.Tensor, pixels: int, k: int) -> torch.Tensor:
        """The k image tokens to compute (sorted), from the last output [B, N, pixels * C] (token
        layout: pixel-major for SD3, channel-major for FLUX, see ``pixels_of``) and the drop counts [N]."""
        metric = token_metric(previous, pixels)
        score = metric * torch.exp(self.starvation * dropped)
        return torch.topk(score, k, sorted=False).indices.sort().values

    # -- the forward ---------------------------------------------------------------------------
    def run(self, runner, step, args, kwargs, block_kwargs) -> torch.Tensor:
        model, adapter = runner.model, runner.adapter
        memory = runner.memory.setdefault(step.branch, {})
        previous = memory.get("ras_out")
        n = None if previous is None else previous.shape[1]
        if previous is None or self.is_full(step, n):
            state = model.embed(*args, **kwargs)
            run = BlockRun(adapter, model, state, block_kwargs, runner.stats)
            self._blocks(run, step, memory, None)
            out = model.final(run.state)
            if self.ratio < 1.0:  # keep the token outputs and the drop counts for the next RAS step
                tokens = adapter.to_tokens(model, out)
                memory["ras_out"] = tokens
                if "ras_dropped" not in memory:
                    memory["ras_dropped"] = torch.zeros(tokens.shape[1], device=tokens.device)
            return out
        k = self.tokens(n)
        dropped = memory["ras_dropped"]
        index = self.select(previous, dropped, adapter.pixels(model), k)
        dropped += 1
        dropped[index] -= 1
        state = model.embed(*args, tokens=index, **kwargs)
        text = adapter.text_count(args, kwargs)
        block_kwargs = adapter.select_controls(block_kwargs, index, n)
        run = BlockRun(adapter, model, state, block_kwargs, runner.stats, weight=(text + k) / (text + n))
        if self.blocks is not None and hasattr(state, "shard"):
            raise InputError(
                "RAS with a block policy cannot run split over ranks (each rank's residuals hold other tokens at "
                "each step): use cache='ras' alone, or the block policy alone, with fastflow.parallel"
            )
        layout = None if self.blocks is None else adapter.layout(state, index, n)
        self._blocks(run, step, memory, layout)
        out = model.final(run.state)  # the kept tokens' outputs [B, k, D] (also MMDiT's: not unpatchified)
        memory["ras_out"] = whole = previous.index_copy(1, index, out.to(previous.dtype))
        return adapter.from_tokens(model, whole, state)

    def _blocks(self, run, step, memory, layout) -> None:
        if self.blocks is None:
            run.compute(0, run.num_blocks)
            return
        inner = memory.setdefault("ras_blocks", {})
        self.blocks.forward(run, step, inner if layout is None else TokenMemory(inner, layout))


def token_metric(out: torch.Tensor, pixels: int) -> torch.Tensor:
    """Per token [N]: the std over channels of each latent pixel, averaged over the token's pixels,
    the largest over the batch (a decision covers the whole batch: the most-changing image decides)."""
    b, n, d = out.shape
    per_pixel = out.float().reshape(b, n, pixels, d // pixels).std(dim=-1)
    return per_pixel.mean(dim=-1).amax(dim=0)


class TokenMemory:
    """A block policy's memory seen through a RAS step: residuals are stored for every image token
    and handed out at the kept tokens; a residual computed at the kept tokens is written back at them."""

    def __init__(self, store: dict, layout: dict):
        self.store, self.layout = store, layout  # layout: stream -> index into the whole stream (None: all)

    def _gather(self, value):
        if not isinstance(value, dict):
            return value
        return {k: v if self.layout.get(k) is None else v.index_select(1, self.layout[k]) for k, v in value.items()}

    def __contains__(self, key) -> bool:
        return key in self.store

    def get(self, key, default=None):
        return self._gather(self.store[key]) if key in self.store else default

    def __getitem__(self, key):
        return self._gather(self.store[key])

    def __setitem__(self, key, value) -> None:
        old = self.store.get(key)
        if isinstance(value, dict):
            if not isinstance(old, dict) or old.keys() != value.keys():
                return  # nothing whole to write into (cannot happen after a full first step): not kept
            value = {
                k: v if self.layout.get(k) is None else old[k].index_copy(1, self.layout[k], v.to(old[k].dtype))
                for k, v in value.items()
            }
        self.store[key] = value

    def setdefault(self, key, default=None):
        if key not in self.store:
            self[key] = default
        return self[key]


def resolve_cache(cache, threshold=None, ras_ratio=None, config=None):
    """A pipeline call's ``cache=`` / ``cache_threshold=`` / ``ras_ratio=``: "ras" (RAS alone), or
    policies.resolve_policy's policy, wrapped in RAS when ``ras_ratio`` is given."""
    if isinstance(cache, str) and cache == "ras":
        if threshold is not None:
            raise InputError("cache='ras' has no threshold: pass ras_ratio= (or RAS(ratio=, warmup=, full_every=))")
        return RAS() if ras_ratio is None else RAS(check_ratio(ras_ratio))
    if isinstance(cache, RAS):
        return resolve(cache, ras_ratio)
    return resolve(resolve_policy(cache, threshold, config), ras_ratio)


def resolve(policy, ras_ratio):
    """A resolved policy plus ``ras_ratio``: RAS alone, or a block policy wrapped in RAS; a
    schedule searched with RAS on (tune-cache --ras) runs with it."""
    if ras_ratio is not None:
        check_ratio(ras_ratio)
    if isinstance(policy, Schedule) and "ras_ratio" in policy.info and ras_ratio is None:
        ras_ratio = check_ratio(policy.info["ras_ratio"])
    if ras_ratio is None:
        return policy
    if policy is None:
        raise InputError(
            "ras_ratio needs cache='ras' (or a block policy to combine with: fbcache, dbcache, a schedule)"
        )
    if isinstance(policy, RAS):
        return RAS(ras_ratio, policy.warmup, policy.full_every, policy.starvation, policy.blocks)
    return RAS(ras_ratio, blocks=policy)


def check_family(policy, model, config) -> None:
    """RAS needs a FLUX or SD3 transformer (a token loop); other families get a typed refusal."""
    from ..models.flux import Flux
    from ..models.mmdit import MMDiT

    if isinstance(policy, RAS) and not isinstance(model, (Flux, MMDiT)):
        family = getattr(config, "family", type(model).__name__)
        raise InputError(
            f"cache='ras' (region-adaptive sampling) is for FLUX and SD3 transformers; the {family} family has "
            f"no token loop to select from. Its cache policies: {FAMILY_POLICIES.get(family, 'none')}"
        )
