"""Searching caching schedules and step placements for a model (``fastflow tune-cache`` /
``fastflow tune-steps``).

* :func:`search_schedules`: an ECAD-style multi-objective genetic search (NSGA-II: non-dominated
  sorting, crowding distance, binary tournaments) over static per-step x per-block-group compute
  masks. Objectives, both minimised: a quality loss on calibration prompts (FD-digits for the
  embedded digits model; otherwise the latent-space negative PSNR against the uncached output at
  the same seeds) and the share of block work computed. Returns the Pareto front.
* :func:`search_steps`: BOSS-style dynamic programming over a fine step grid: the ``k`` sigmas
  whose one-step Euler jumps best follow a fine-step trajectory of the same model.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .caching import Schedule
from .errors import InputError

Mask = tuple[tuple[bool, ...], ...]


# -- objectives ----------------------------------------------------------------------------------
class Calibration:
    """The calibration set and quality loss of one model and step count. ``images_per_prompt``
    images per prompt at fixed seeds, all in one call (a static schedule decides the same for
    every image, so batching does not change what is measured)."""

    def __init__(
        self, pipe, prompts: list[str], steps: int, images_per_prompt: int = 2, seed: int = 0, fd=None, reference=None
    ):
        self.pipe, self.prompts, self.steps = pipe, list(prompts), steps
        self.kwargs = {
            "num_inference_steps": steps,
            "num_images_per_prompt": images_per_prompt,
            "seed": seed,
            "progress": False,
        }
        self.fd = fd  # (yardstick, labels) for FD-digits, else None
        # the target of the PSNR loss: the uncached result, or ``reference`` (e.g. {"num_inference_steps": 64})
        self.reference = None if fd is not None else self._latents(None, **(reference or {}))

    def _latents(self, cache, **extra) -> torch.Tensor:
        return self.pipe(self.prompts, output_type="latent", cache=cache, **{**self.kwargs, **extra}).images

    def loss(self, schedule: Schedule | None = None, **extra) -> float:
        """The quality loss with ``schedule`` as the cache and ``extra`` pipeline arguments (sigmas=)."""
        if self.fd is not None:
            from .evaluation import to_digit_space

            stick, labels = self.fd
            images = self.pipe(self.prompts, output_type="np", cache=schedule, **{**self.kwargs, **extra}).images
            return stick.score(to_digit_space(images), labels)["fd_digits"]
        from .evaluation import psnr

        return -psnr(self._latents(schedule, **extra), self.reference)

    @property
    def loss_name(self) -> str:
        return "FD-digits" if self.fd is not None else "-PSNR(latent)"


def digits_calibration(pipe, steps: int, images_per_prompt: int = 2, seed: int = 0) -> Calibration:
    """The embedded model's calibration: the 30 digit prompts of bench/quality.py, FD-digits."""
    from .evaluation import NUMBER_WORDS, PROMPTS, Yardstick

    prompts = [t.format(w=NUMBER_WORDS[d], d=d) for d in range(10) for t in PROMPTS]
    labels = np.repeat(np.arange(10), len(PROMPTS) * images_per_prompt)
    return Calibration(pipe, prompts, steps, images_per_prompt, seed, fd=(Yardstick(), labels))


# -- NSGA-II -------------------------------------------------------------------------------------
@dataclass
class Candidate:
    mask: Mask
    loss: float
    work: float
    rank: int = 0
    crowding: float = 0.0

    def dominates(self, other: Candidate) -> bool:
        no_worse = self.loss <= other.loss and self.work <= other.work
        return no_worse and (self.loss < other.loss or self.work < other.work)


def non_dominated_fronts(pop: list[Candidate]) -> list[list[Candidate]]:
    """Deb's fast non-dominated sort; sets each candidate's rank."""
    dominated_by = {id(p): [] for p in pop}
    count = {id(p): 0 for p in pop}
    fronts: list[list[Candidate]] = [[]]
    for p in pop:
        for q in pop:
            if p.dominates(q):
                dominated_by[id(p)].append(q)
            elif q.dominates(p):
                count[id(p)] += 1
        if count[id(p)] == 0:
            p.rank = 0
            fronts[0].append(p)
    while fronts[-1]:
        nxt = []
        for p in fronts[-1]:
            for q in dominated_by[id(p)]:
                count[id(q)] -= 1
                if count[id(q)] == 0:
                    q.rank = len(fronts)
                    nxt.append(q)
        fronts.append(nxt)
    return fronts[:-1]


def crowding(front: list[Candidate]) -> None:
    for c in front:
        c.crowding = 0.0
    for key in ("loss", "work"):
        ordered = sorted(front, key=lambda c: getattr(c, key))
        ordered[0].crowding = ordered[-1].crowding = float("inf")
        span = getattr(ordered[-1], key) - getattr(ordered[0], key) or 1.0
        for a, c, b in zip(ordered, ordered[1:], ordered[2:], strict=False):
            c.crowding += (getattr(b, key) - getattr(a, key)) / span


def seed_masks(steps: int, groups: int, budget: float, rng: random.Random, count: int) -> list[Mask]:
    """Structured starting points (periodic full steps, first/last group always on, compute-heavy
    early steps) plus random masks with densities in [budget, 1]."""
    masks = [tuple(tuple([True] * groups) for _ in range(steps))]
    for period in (2, 3, 4):
        masks.append(tuple(tuple([i % period == 0] * groups) for i in range(steps)))
        edges = [True] + [False] * (groups - 2) + [True] if groups > 2 else [True] * groups
        masks.append(tuple(tuple([True] * groups if i % period == 0 else edges) for i in range(steps)))
        masks.append(tuple(tuple([i < steps // 4 or i % period == 0] * groups) for i in range(steps)))
    while len(masks) < count:
        density = rng.uniform(budget, 1.0)
        masks.append(tuple(tuple(rng.random() < density for _ in range(groups)) for _ in range(steps)))
    return [repair(m, budget, rng) for m in masks[:count]]


def work_of(mask: Mask) -> float:
    return sum(map(sum, mask)) / (len(mask) * len(mask[0]))


def repair(mask: Mask, budget: float, rng: random.Random) -> Mask:
    """Step 0 computes everything, and at least ``budget`` of the work is computed."""
    rows = [list(r) for r in mask]
    rows[0] = [True] * len(rows[0])
    cells = [(i, j) for i in range(len(rows)) for j in range(len(rows[0])) if not rows[i][j]]
    rng.shuffle(cells)
    total = len(rows) * len(rows[0])
    while cells and sum(map(sum, rows)) / total < budget:
        i, j = cells.pop()
        rows[i][j] = True
    return tuple(tuple(r) for r in rows)


def offspring(a: Mask, b: Mask, budget: float, rng: random.Random) -> Mask:
    rows = [list(ra if rng.random() < 0.5 else rb) for ra, rb in zip(a, b, strict=True)]  # row-wise crossover
    flips = 2.0 / (len(rows) * len(rows[0]))
    for i, row in enumerate(rows):
        if rng.random() < 0.05:  # row mutation: the whole step on, or as the step before
            rows[i] = [True] * len(row) if rng.random() < 0.5 or i == 0 else list(rows[i - 1])
            continue
        for j in range(len(row)):
            if rng.random() < flips:
                row[j] = not row[j]
    return repair(tuple(tuple(r) for r in rows), budget, rng)


def search_schedules(
    evaluate: Callable[[Mask], float],
    steps: int,
    groups: int,
    budget: float = 0.3,
    population: int = 12,
    generations: int = 6,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[Candidate]:
    """NSGA-II over compute masks; ``evaluate(mask)`` returns the quality loss. Returns the final
    Pareto front sorted by work."""
    if not 0 < budget <= 1:
        raise InputError(f"budget must be in (0, 1], got {budget}")
    rng = random.Random(seed)
    seen: dict[Mask, Candidate] = {}

    def scored(mask: Mask) -> Candidate:
        if mask not in seen:
            seen[mask] = Candidate(mask, evaluate(mask), work_of(mask))
        return seen[mask]

    pop = [scored(m) for m in seed_masks(steps, groups, budget, rng, population)]
    for generation in range(generations):
        for front in non_dominated_fronts(pop):
            crowding(front)

        def tournament(pop=pop) -> Candidate:
            a, b = rng.sample(pop, 2)
            return a if (a.rank, -a.crowding) < (b.rank, -b.crowding) else b

        children = []
        while len(children) < population:
            child = offspring(tournament().mask, tournament().mask, budget, rng)
            if child not in seen or rng.random() < 0.2:
                children.append(scored(child))
        merged = list({c.mask: c for c in pop + children}.values())
        pop = []
        for front in non_dominated_fronts(merged):
            crowding(front)
            pop += sorted(front, key=lambda c: -c.crowding)[: population - len(pop)]
            if len(pop) >= population:
                break
        if log:
            best = non_dominated_fronts(pop)[0]
            log(
                f"generation {generation + 1}: {len(seen)} evaluated, front "
                + ", ".join(f"{c.work:.2f}/{c.loss:.3f}" for c in sorted(best, key=lambda c: c.work))
            )
    return sorted(non_dominated_fronts(list(seen.values()))[0], key=lambda c: c.work)


# -- step placement ------------------------------------------------------------------------------
def search_steps(trajectories: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> list[float]:
    """``k`` sigmas (starting at the first of the grid) whose one-step Euler jumps best follow the
    fine trajectories: ``trajectories`` are (sigmas [N + 1] ending at 0, states [N + 1, ...]) of
    Euler runs on the same fine grid. Dynamic programming over grid indices minimises the summed
    squared one-step error ``|x_i + (s_j - s_i) v_i - x_j|^2`` (v_i from the fine run)."""
    sigmas = trajectories[0][0].double()
    n = len(sigmas) - 1
    if not 1 <= k <= n:
        raise InputError(f"steps must be between 1 and the fine grid's {n}, got {k}")
    cost = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    for grid, states in trajectories:
        x = states.double().flatten(1)
        v = (x[1:] - x[:-1]) / (grid[1:] - grid[:-1]).double()[:, None]  # Euler: the fine velocities
        for i in range(n):
            jump = x[i] + (sigmas[i + 1 :] - sigmas[i])[:, None] * v[i]
            cost[i, i + 1 :] += (jump - x[i + 1 :]).pow(2).mean(1)
    best = torch.full((k + 1, n + 1), float("inf"), dtype=torch.float64)
    parent = torch.zeros(k + 1, n + 1, dtype=torch.long)
    best[0, 0] = 0.0
    for m in range(1, k + 1):
        for j in range(1, n + 1):
            totals = best[m - 1, :j] + cost[:j, j]
            parent[m, j] = int(totals.argmin())
            best[m, j] = totals.min()
    path, j = [n], n
    for m in range(k, 0, -1):
        j = int(parent[m, j])
        path.append(j)
    path.reverse()
    return [float(sigmas[i]) for i in path[:-1]]


def refine_steps(
    loss: Callable[[list[float]], float], start: list[list[float]], fine: int
) -> tuple[list[float], float]:
    """Coordinate descent of the step sigmas on a ``fine`` grid (sigma = i / fine; the first stays
    1.0), from the best of the ``start`` candidates, moves halving from fine/8 to one grid step,
    minimising ``loss(sigmas)`` (the calibration quality of a whole k-step run)."""
    scored = [(loss(s), [round(v * fine) for v in s]) for s in start]
    best_loss, best = min(scored)
    move = max(1, fine // 8)
    while move >= 1:
        improved = False
        for k in range(1, len(best)):
            for delta in (-move, move):
                trial = list(best)
                trial[k] += delta
                if not all(a > b for a, b in zip([fine, *trial[1:]], trial[1:] + [0], strict=True)):
                    continue
                value = loss([i / fine for i in trial])
                if value < best_loss:
                    best_loss, best, improved = value, trial, True
        if not improved:
            move //= 2
    return [i / fine for i in best], best_loss


def fine_trajectory(pipe, prompt: str, seed: int, grid: torch.Tensor) -> torch.Tensor:
    """Euler states [N + 1, ...] of one generation on the sigma ``grid`` (N + 1 values ending at 0),
    through the pipeline's own prepare (text, guidance, noise): the reference for :func:`search_steps`."""
    import inspect
    from types import SimpleNamespace

    from .pipelines.sd3 import SD3Pipeline
    from .pipelines.template import Timer
    from .samplers import Step

    request = {k: p.default for k, p in inspect.signature(pipe.__call__).parameters.items()}
    for key in ("output_type", "callback", "progress", "cache", "cache_threshold"):
        request.pop(key, None)
    if isinstance(pipe, SD3Pipeline):
        request.pop("image", None)
    n = len(grid) - 1
    request.update(prompt=prompt, seed=seed, sigmas=[float(s) for s in grid[:-1]], num_inference_steps=n)
    plan = pipe.prepare(Timer(), SimpleNamespace(**request))
    x, states = plan.noise, [plan.noise]
    with torch.no_grad():
        for i in range(n):
            s, s_next = float(grid[i]), float(grid[i + 1])
            x = x + (s_next - s) * plan.velocity(x, Step(s, i, s_next, n)).float()
            states.append(x)
    return torch.stack(states)
