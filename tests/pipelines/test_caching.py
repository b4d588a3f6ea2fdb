"""Feature caching (issue 12): bit-identical when nothing is skipped, per-branch and per-call
state, every policy saving work at a small distance, composition, bad input, the tuners."""

import json
import random
import threading

import pytest
import torch

from fastflow import errors
from fastflow.caching import DBCache, FBCache, Schedule, TaylorSeer, TeaCache, relative_change, resolve_policy
from fastflow.tuning import Candidate, crowding, non_dominated_fronts, search_schedules, search_steps

STEPS = 12


def _call(pipe, **kw):
    kw = {
        "prompt": ["a handwritten seven", "number two"],
        "seed": 5,
        "num_inference_steps": STEPS,
        "output_type": "latent",
        **kw,
    }
    return pipe(**kw)


@pytest.mark.parametrize(
    "policy",
    [FBCache(0), TeaCache(0), DBCache(1, 1, 0), Schedule([[1] * 4] * STEPS), Schedule([[1, 1]] * STEPS)],
    ids=["fbcache", "teacache", "dbcache", "schedule-blocks", "schedule-groups"],
)
def test_nothing_skipped_is_bit_identical(digits, policy):
    base, out = _call(digits), _call(digits, cache=policy)
    assert torch.equal(out.images, base.images)
    assert out.stats["blocks_computed"] == out.stats["blocks_total"] == base.stats["blocks_total"] == STEPS * 4


@pytest.mark.parametrize(
    "cache, threshold",
    [("fbcache", 0.5), ("teacache", 0.4), ("taylorseer", None), ("dbcache", 0.5)],
)
def test_policies_save_work_close_to_the_uncached_result(digits, cache, threshold):
    base = _call(digits)
    out = _call(digits, cache=cache, cache_threshold=threshold)
    assert out.stats["work_saved"] > 0.1
    assert out.settings["cache"].startswith(cache)
    err = (out.images - base.images).norm() / base.images.norm()
    assert 0 < err < 0.15


def test_a_schedule_skips_exactly_its_mask(digits):
    mask = [[1, 1, 1, 1]] + [[1, 0, 0, 1] if i % 2 else [1, 1, 1, 1] for i in range(STEPS - 1)]
    out = _call(digits, cache=Schedule(mask))
    assert out.stats["blocks_computed"] == sum(map(sum, mask))


class Recorder:
    """A policy that computes everything and remembers which branches and steps it saw."""

    def __init__(self):
        self.seen = []

    def describe(self):
        return "recorder"

    def forward(self, run, step, memory):
        memory.setdefault("calls", 0)
        memory["calls"] += 1
        self.seen.append((step.branch, step.index, step.stage, memory["calls"], id(memory)))
        run.compute(0, run.num_blocks)


def test_state_is_per_branch_sd3_cfg_and_slg(pipeline_folders):
    import fastflow

    pipe = fastflow.load(pipeline_folders["sd3.5-tiny-medium"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rec = Recorder()
    pipe(
        "a cat",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=4.5,
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        output_type="latent",
        cache=rec,
        seed=0,
    )
    branches = {b for b, *_ in rec.seen}
    assert branches == {"cfg", "slg"}
    memories = {b: {m for bb, *_, m in rec.seen if bb == b} for b in branches}
    assert len(memories["cfg"]) == len(memories["slg"]) == 1 and memories["cfg"] != memories["slg"]
    rec.seen.clear()  # a second call starts with fresh state
    pipe("a cat", height=32, width=32, num_inference_steps=2, output_type="latent", cache=rec, seed=0)
    assert rec.seen[0][3] == 1


def test_slg_pass_counts_only_the_blocks_it_runs(pipeline_folders):
    import fastflow

    pipe = fastflow.load(pipeline_folders["sd3.5-tiny-medium"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kw = {
        "height": 32,
        "width": 32,
        "num_inference_steps": 4,
        "guidance_scale": 4.5,
        "skip_guidance_layers": [1],
        "skip_layer_guidance_start": 0.0,
        "skip_layer_guidance_stop": 1.0,
        "output_type": "latent",
        "seed": 0,
    }
    plain, cached = pipe("a cat", **kw), pipe("a cat", cache=FBCache(0), **kw)
    n, slg_calls = pipe.transformer.num_blocks, plain.stats["transformer_calls"] - 4
    assert plain.stats == cached.stats and slg_calls > 0
    assert plain.stats["blocks_total"] == 4 * n + slg_calls * (n - 1)
    assert torch.equal(plain.images, cached.images)


def test_kontext_and_true_cfg_and_batches_compose(pipeline_folders):
    import numpy as np
    from PIL import Image

    import fastflow

    pipe = fastflow.load(pipeline_folders["flux-tiny-kontext"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    kw = {
        "image": image,
        "num_inference_steps": 12,
        "output_type": "latent",
        "seed": 1,
        "auto_resize": False,
        "true_cfg_scale": 1.5,
        "negative_prompt": "blurry",
        "num_images_per_prompt": 2,
    }
    base = pipe("make it red", **kw)
    out = pipe("make it red", cache=TaylorSeer(order=1, interval=2), **kw)
    assert out.images.shape == base.images.shape and out.stats["work_saved"] > 0.25
    assert (out.images - base.images).norm() / base.images.norm() < 0.1


def test_compiled_blocks_run_under_a_policy_without_graph_breaks(pipeline_folders):
    import fastflow

    pipe = fastflow.load(pipeline_folders["flux-tiny-dev"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    kw = {"height": 32, "width": 32, "num_inference_steps": 4, "output_type": "latent", "seed": 0}
    base = pipe("a cat", cache=FBCache(0), **kw)
    for block in list(pipe.transformer.double_blocks) + list(pipe.transformer.single_blocks):
        block.compile(backend="aot_eager", fullgraph=True)  # a graph break inside a block raises
    out = pipe("a cat", cache=FBCache(0), **kw)
    torch.testing.assert_close(out.images, base.images)


def test_concurrent_generations_keep_their_own_state_and_stats(digits):
    results = {}

    def run(name, cache):
        results[name] = _call(digits, cache=cache)

    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("none", None), ("tea", "teacache"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["none"].stats["work_saved"] == 0 and results["tea"].stats["work_saved"] > 0
    assert torch.equal(results["none"].images, _call(digits).images)


def test_relative_change_takes_the_worst_image():
    old = torch.ones(3, 4, 8)
    new = old.clone()
    new[2] *= 1.5  # only the third image changes
    assert relative_change(new, old) == pytest.approx(0.5)
    assert relative_change({"a": new}, {"a": old}) == pytest.approx(0.5)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylorseer_forecast_is_exact_for_polynomials_of_its_order(order):
    def f(s):
        return {"x": torch.full((2,), 3.0 + 2.0 * s * (order >= 1) + 5.0 * s * s * (order >= 2))}

    history = [(s, f(s)) for s in (0.9, 0.7, 0.5)[-(order + 1) :]]
    torch.testing.assert_close(TaylorSeer.forecast(history, 0.3)["x"], f(0.3)["x"])


@pytest.mark.parametrize(
    "cache, threshold, match",
    [
        ("nope", None, "fbcache"),
        ("fbcache", -1.0, ">= 0"),
        ("fbcache", float("nan"), "finite"),
        ("taylorseer", 0.1, "no threshold"),
        (None, 0.1, "needs cache="),
        (3, None, "cache must be"),
    ],
)
def test_bad_cache_arguments_are_input_errors(cache, threshold, match):
    with pytest.raises(errors.InputError, match=match):
        resolve_policy(cache, threshold)


def test_schedule_files_round_trip_and_are_checked(tmp_path, digits):
    mask = [[1] * 4] + [[0, 1, 1, 0]] * (STEPS - 1)
    path = tmp_path / "s.json"
    Schedule(mask, info={"work": 0.5}).save(path)
    loaded = resolve_policy(str(path))
    assert loaded.mask == [[bool(v) for v in r] for r in mask] and loaded.info["work"] == 0.5
    with pytest.raises(errors.InputError, match="for 12 steps"):
        _call(digits, cache=str(path), num_inference_steps=5)
    (tmp_path / "other.json").write_text(json.dumps({"mask": mask}))
    with pytest.raises(errors.InputError, match="not a fastflow cache schedule"):
        resolve_policy(str(tmp_path / "other.json"))
    with pytest.raises(errors.InputError, match="step 0"):
        Schedule([[0, 1]])


def test_sigmas_are_used_as_given(digits):
    sigmas = [1.0, 0.75, 0.5, 0.25]
    default = _call(digits, num_inference_steps=4)
    given = _call(digits, sigmas=sigmas, num_inference_steps=None)
    assert torch.equal(given.images, default.images)  # the embedded model's schedule is unshifted
    assert given.settings["sigmas"] == sigmas
    other = _call(digits, sigmas=[1.0, 0.86, 0.64, 0.33], num_inference_steps=4)
    assert not torch.equal(other.images, default.images)
    for bad in ([1.0, 1.0, 0.5, 0.2], [1.5, 0.5, 0.3, 0.1], [1.0, 0.5]):
        with pytest.raises(errors.InputError, match="sigmas"):
            _call(digits, sigmas=bad, num_inference_steps=4)


# -- the tuners ----------------------------------------------------------------------------------
def test_non_dominated_sort_and_crowding():
    pts = [Candidate((), loss, work) for loss, work in [(1, 1), (2, 0.5), (3, 0.2), (2, 1), (3, 0.6), (4, 0.9)]]
    fronts = non_dominated_fronts(pts)
    assert {(c.loss, c.work) for c in fronts[0]} == {(1, 1), (2, 0.5), (3, 0.2)}
    assert {(c.loss, c.work) for c in fronts[1]} == {(2, 1), (3, 0.6)}
    crowding(fronts[0])
    assert sorted(c.crowding for c in fronts[0])[-1] == float("inf")


def test_schedule_search_returns_a_non_dominated_front():
    weights = [[random.Random(i * 7 + j).random() for j in range(3)] for i in range(6)]

    def loss(mask):  # skipping a cell costs its weight
        return sum(w for row, ws in zip(mask, weights, strict=True) for on, w in zip(row, ws, strict=True) if not on)

    front = search_schedules(loss, steps=6, groups=3, budget=0.3, population=10, generations=5, seed=1)
    assert all(not a.dominates(b) for a in front for b in front)
    assert any(c.work == 1.0 and c.loss == 0 for c in front)
    assert all(all(c.mask[0]) and c.work >= 0.3 for c in front)
    assert len(front) >= 4


def test_step_search_matches_brute_force():
    import itertools

    grid = torch.linspace(1, 0, 9)
    states = (grid**3 + 0.5 * grid)[:, None].repeat(1, 2)  # a curved 1-D trajectory, two "pixels"
    chosen = search_steps([(grid, states)], 3)

    def cost(points):
        x = states.double()
        v = (x[1:] - x[:-1]) / (grid[1:] - grid[:-1]).double()[:, None]
        path = [*points, 8]
        return sum(
            ((x[i] + (grid[j] - grid[i]) * v[i] - x[j]) ** 2).mean().item()
            for i, j in zip(path, path[1:], strict=False)
        )

    best = min(((0, *c) for c in itertools.combinations(range(1, 8), 2)), key=cost)
    assert chosen == [float(grid[i]) for i in best]


def test_tune_cli_commands_write_usable_results(tmp_path, digits):
    from fastflow.cli import main

    out = tmp_path / "schedules"
    assert (
        main(
            [
                "tune-cache",
                "--steps",
                "3",
                "--images-per-prompt",
                "1",
                "--population",
                "3",
                "--generations",
                "1",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    files = sorted(out.glob("*.json"))
    assert files
    assert _call(digits, cache=str(files[0]), num_inference_steps=3).images is not None
    assert main(["tune-steps", "--steps", "2", "--fine", "8", "-o", str(tmp_path / "s.json")]) == 0
    sigmas = json.loads((tmp_path / "s.json").read_text())["sigmas"]
    assert len(sigmas) == 2 and sigmas[0] == 1.0


def test_step_refinement_descends_to_the_best_grid_point():
    from fastflow.tuning import refine_steps

    target = [1.0, 0.625, 0.25]

    def loss(sigmas):
        return sum((a - b) ** 2 for a, b in zip(sigmas, target, strict=True))

    sigmas, value = refine_steps(loss, [[1.0, 2 / 3, 1 / 3]], fine=16)
    assert sigmas == target and value == 0
