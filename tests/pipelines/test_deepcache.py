"""DeepCache (issue 37) on the SDXL UNet and the SVD VideoUNet: the shallow pass from a fresh feature
is the full pass; interval 1 is bit-identical to no cache; the block counts; the schedules depend on
the step index only; composition with CFG, batches, inpainting, ControlNets, FP8, LoRA, the compile
path (no graph breaks) and the CFG row split of fastflow.parallel; bad input refused."""

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import fastflow
from fastflow.caching import DeepCache
from fastflow.caching.deepcache import DeepFeature, nonuniform_steps
from fastflow.errors import InputError
from fastflow.models import configs
from fastflow.models.unet import UNet

from ..conftest import tiny_pipeline_folder
from ..dist_util import check_ranks, run_ranks

STEPS = 6
KW = {"prompt": ["a seven", "a two"], "seed": 3, "num_inference_steps": STEPS, "output_type": "latent",
      "height": 32, "width": 32}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_pipeline_folder(tmp_path_factory.mktemp("deepcache") / "sdxl-tiny", "sdxl-tiny")


def _load(folder, **kw):
    pipe = fastflow.load(folder, dtype=torch.float32, device="cpu", **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(folder):
    return _load(folder)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _unet_inputs(cfg, b=2, side=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, side, side, generator=g), torch.full((b,), 400.0),
            torch.randn(b, 5, cfg.context_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g),
            torch.rand(b, 6, generator=g) * 64)  # fmt: skip


def _random_unet():
    torch.manual_seed(0)
    model = UNet(configs.from_name("sdxl-tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


@torch.no_grad()
def test_the_shallow_pass_from_a_fresh_feature_is_the_full_pass():
    model = _random_unet()
    args = _unet_inputs(model.config)
    ref = model(*args)
    for branch in range(len(model.input_blocks)):
        plan = DeepFeature(branch)
        assert torch.equal(model(*args, deep_cache=plan), ref)  # a full pass keeps the feature
        assert torch.equal(model(*args, deep_cache=DeepFeature(branch, plan.feature)), ref)
        stale = model(*args, deep_cache=DeepFeature(branch, torch.zeros_like(plan.feature)))
        assert not torch.equal(stale, ref)  # the shallow pass reads the kept feature


@pytest.mark.parametrize("branch", [0, 3, 5])
def test_interval_one_is_bit_identical(sdxl, branch):
    base = sdxl(**KW)
    out = sdxl(**KW, cache="deepcache", cache_interval=1, cache_branch=branch)
    assert torch.equal(out.images, base.images)
    assert out.stats == base.stats and out.stats["blocks_total"] == STEPS * sdxl.unet.num_blocks
    assert out.settings["cache"] == f"deepcache:N1B{branch}"


@pytest.mark.parametrize("schedule", ["uniform", "nonuniform"])
@pytest.mark.parametrize("branch", [0, 2])
def test_blocks_counted_per_forward_and_work_saved(sdxl, schedule, branch):
    policy = DeepCache(interval=3, branch=branch, schedule=schedule)
    base, out = sdxl(**KW), sdxl(**KW, cache=policy)
    full = len(policy.full_steps(STEPS))
    n = sdxl.unet.num_blocks  # 6 input blocks + middle + 6 output blocks
    assert n == 13 and out.stats["transformer_calls"] == STEPS  # CFG: one batched forward per step
    assert out.stats["blocks_computed"] == full * n + (STEPS - full) * 2 * (branch + 1)
    assert out.stats["blocks_total"] == STEPS * n
    assert out.stats["work_saved"] > 0.3
    assert 0 < _rel(out.images, base.images) < 0.6


def test_schedules_depend_on_the_step_index_only():
    """Every rank of a split generation takes the same decisions: the plan is a function of
    (step index, step count) and of whether this generation has a feature yet, never of data."""
    from fastflow.samplers import Step

    for schedule in ("uniform", "nonuniform"):
        policy = DeepCache(interval=4, branch=1, schedule=schedule)
        for steps in (1, 5, 25, 50):
            plans = []
            for feature in (torch.zeros(1), torch.randn(7), torch.full((3,), math.nan)):
                memory = {"feature": feature}
                plans.append([policy.forward(Step(1.0, i, 0.5, steps), memory).feature is None for i in range(steps)])
            assert plans[0] == plans[1] == plans[2]
            assert [i for i, full in enumerate(plans[0]) if full] == sorted(policy.full_steps(steps))
            assert 0 in policy.full_steps(steps) and len(policy.full_steps(steps)) == math.ceil(steps / 4)
    assert policy.forward(Step(1.0, 3, 0.5, 8), {}).feature is None  # no feature yet: full


def test_nonuniform_places_more_full_steps_near_its_center():
    full = sorted(nonuniform_steps(50, 3, center=0.3))
    assert len(full) == 17 and full[0] == 0
    gaps = np.diff(full)
    middle = [g for s, g in zip(full, gaps, strict=False) if 10 <= s <= 20]
    late = [g for s, g in zip(full, gaps, strict=False) if s >= 35]
    assert max(middle) < min(late)
    assert sorted(nonuniform_steps(6, 1)) == list(range(6))


def test_state_is_per_generation_and_guidance_branch(sdxl):
    policy = DeepCache(interval=2, branch=1)
    alone = {"cfg": sdxl(**KW, cache=policy), "plain": sdxl(**KW, guidance_scale=1.0, cache=policy)}
    results = {}

    def run(name, guidance):
        results[name] = sdxl(**KW, guidance_scale=guidance, cache=policy)

    threads = [threading.Thread(target=run, args=a) for a in (("cfg", None), ("plain", 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in alone:
        assert torch.equal(results[name].images, alone[name].images)
        assert results[name].stats == alone[name].stats
    assert not hasattr(policy, "memory") and vars(policy).keys() == {"interval", "branch", "schedule", "center",
                                                                     "power"}  # fmt: skip


def test_each_image_of_a_batch_is_its_own(sdxl):
    batch = sdxl(**dict(KW, seed=[3, 4]), cache="deepcache:2:1")
    one = sdxl(**dict(KW, prompt="a two", seed=[4]), cache="deepcache:2:1")
    assert _rel(batch.images[1:], one.images) < 1e-3  # batch-size rounding only (a mix-up is ~1)


def _image(seed, side=32):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _mask(side=32):
    mask = np.zeros((side, side), np.uint8)
    mask[8:24, 6:20] = 255
    return Image.fromarray(mask)


def test_inpainting_composes(sdxl):
    kw = dict(KW, image=_image(0), mask_image=_mask(), strength=0.8)
    base = sdxl(**kw)
    assert torch.equal(sdxl(**kw, cache="deepcache", cache_interval=1).images, base.images)
    out = sdxl(**kw, cache="deepcache", cache_interval=2, cache_branch=1)
    assert out.stats["work_saved"] > 0.2 and 0 < _rel(out.images, base.images) < 0.6


def test_controlnet_composes(folder, tmp_path):
    from .test_controlnet import sdxl_controlnet

    sdxl_controlnet(folder, 10).save_pretrained(tmp_path / "cn")
    pipe = _load(folder, controlnet=tmp_path / "cn")
    kw = dict(KW, control_image=_image(1), controlnet_conditioning_scale=0.8, control_guidance_end=0.7)
    base = pipe(**kw)
    assert torch.equal(pipe(**kw, cache="deepcache", cache_interval=1, cache_branch=2).images, base.images)
    out = pipe(**kw, cache="deepcache", cache_interval=2, cache_branch=2)
    assert out.stats["work_saved"] > 0.2 and 0 < _rel(out.images, base.images) < 0.6
    img2img = pipe(**kw, image=_image(2), strength=0.7, cache="deepcache", cache_interval=2)
    assert img2img.stats["transformer_calls"] < STEPS and img2img.stats["work_saved"] > 0.2


def test_fp8_composes(folder):
    pipe = fastflow.accelerate(_load(folder), compile=False, quant="fp8")
    base = pipe(**KW)
    assert torch.equal(pipe(**KW, cache="deepcache", cache_interval=1).images, base.images)
    out = pipe(**KW, cache="deepcache", cache_interval=3, cache_branch=1)
    assert out.stats["work_saved"] > 0.3 and torch.isfinite(out.images).all()


def test_lora_composes(folder, tmp_path):
    from safetensors.torch import save_file

    pipe = _load(folder)
    base = pipe(**KW)
    g = torch.Generator().manual_seed(0)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    width = pipe.unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.in_features
    down, up = torch.randn(4, width, generator=g), torch.randn(width, 4, generator=g)
    save_file({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, str(tmp_path / "l.safetensors"))
    pipe.load_lora(tmp_path / "l.safetensors", scale=1.0)
    lora = pipe(**KW)
    assert not torch.equal(lora.images, base.images)
    assert torch.equal(pipe(**KW, cache="deepcache", cache_interval=1).images, lora.images)
    out = pipe(**KW, cache="deepcache", cache_interval=2, cache_branch=1)
    assert out.stats["work_saved"] > 0.2 and 0 < _rel(out.images, lora.images) < 0.6


@torch.no_grad()
def test_full_and_shallow_paths_compile_without_graph_breaks():
    """dynamo's explain on the UNet forward of both paths, and fullgraph=True (aot_eager: the
    "fastflow" backend's graph is the same; it compiles for minutes on a shared CPU)."""
    model = _random_unet()
    args = _unet_inputs(model.config)
    plan = DeepFeature(2)
    ref = model(*args, deep_cache=plan)
    for deep in (DeepFeature(2), DeepFeature(2, plan.feature)):
        assert torch._dynamo.explain(model)(*args, deep_cache=deep).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    full = DeepFeature(2)
    torch.testing.assert_close(compiled(*args, deep_cache=full), ref)
    torch.testing.assert_close(full.feature, plan.feature)  # the compiled pass keeps the feature
    shallow = compiled(*args, deep_cache=DeepFeature(2, plan.feature))
    torch.testing.assert_close(shallow, ref)
    torch._dynamo.reset()


def test_bad_input_names_the_family_and_its_policies(sdxl, folder):
    for kw, match in (
        ({"cache_interval": 0}, "interval must be an integer >= 1"),
        ({"cache_interval": 1.5}, "interval must be an integer >= 1"),
        ({"cache_interval": True}, "interval must be an integer >= 1"),
        ({"cache_branch": -1}, "branch must be an integer >= 0"),
        ({"cache_branch": 6}, r"branch 6 is out of range: this UNet has 6 skip branches \(0 .. 5"),
        ({"cache_threshold": 0.1}, "deepcache has no threshold"),
    ):
        with pytest.raises(InputError, match=match):
            sdxl(**KW, cache="deepcache", **kw)
    with pytest.raises(InputError, match=r"sdxl \(UNet\) cannot run cache='fbcache'; its cache policies: deepcache"):
        sdxl(**KW, cache="fbcache")
    with pytest.raises(InputError, match="cache_interval / cache_branch are DeepCache's.*policies: deepcache"):
        sdxl(**KW, cache_interval=2)
    with pytest.raises(InputError, match="deepcache:INTERVAL:BRANCH"):
        sdxl(**KW, cache="deepcache:x")
    with pytest.raises(InputError, match="already gives the numbers"):
        sdxl(**KW, cache="deepcache:2", cache_branch=1)
    with pytest.raises(InputError, match="schedule must be one of uniform, nonuniform"):
        DeepCache(schedule="cosine")


def test_dit_families_refuse_deepcache(pipeline_folders):
    pipe = _load(pipeline_folders["flux-tiny-dev"])
    kw = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "latent"}
    with pytest.raises(
        InputError, match=r"deepcache is for UNets \(SDXL, SVD\); flux \(Flux\) cache policies: fbcache"
    ):
        pipe(**kw, cache="deepcache")
    with pytest.raises(InputError, match="deepcache is for UNets"):
        pipe(**kw, cache=DeepCache(2))
    with pytest.raises(InputError, match="cache_interval.*DeepCache's.*cache policies: fbcache, teacache"):
        pipe(**kw, cache="deepcache", cache_interval=2)
    sd3 = _load(pipeline_folders["sd3.5-tiny-medium"])
    with pytest.raises(InputError, match="cache_branch.*DeepCache's.*cache policies: fbcache"):
        sd3(**kw, cache_branch=1)


# -- SVD ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svd():
    from .test_svd import _build

    return _build("svd")[1]


def test_svd_interval_one_is_bit_identical_and_caching_saves_work(svd):
    kw = {"image": torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(0)), "height": 16, "width": 24,
          "num_inference_steps": 5, "seed": 2, "output_type": "latent", "max_guidance_scale": 2.5}  # fmt: skip
    base = svd(**kw)
    same = svd(**kw, cache="deepcache", cache_interval=1, cache_branch=1)
    assert torch.equal(same.frames, base.frames) and same.stats == base.stats
    n = svd.unet.num_blocks
    out = svd(**kw, cache=DeepCache(interval=2, branch=1, schedule="nonuniform"))
    assert out.stats["blocks_computed"] == 3 * n + 2 * 4 and out.stats["blocks_total"] == 5 * n
    assert 0 < _rel(out.frames, base.frames) < 0.6
    with pytest.raises(InputError, match="has 6 skip branches"):
        svd(**kw, cache="deepcache", cache_branch=6)
    with pytest.raises(InputError, match="its cache policies: deepcache"):
        svd(**kw, cache="teacache")


@torch.no_grad()
def test_svd_shallow_pass_from_a_fresh_feature_is_the_full_pass(svd):
    unet = svd.unet
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 3, cfg.in_channels, 8, 8, generator=g), 0.5,
            torch.randn(1, 1, cfg.context_dim, generator=g), torch.rand(1, cfg.num_time_ids, generator=g))  # fmt: skip
    ref = unet(*args)
    for branch in range(len(unet.input_blocks)):
        plan = DeepFeature(branch)
        assert torch.equal(unet(*args, deep_cache=plan), ref)
        assert torch.equal(unet(*args, deep_cache=DeepFeature(branch, plan.feature)), ref)
    for deep in (DeepFeature(1), DeepFeature(1, torch.zeros_like(plan.feature) if branch == 1 else None)):
        assert torch._dynamo.explain(unet)(*args, deep_cache=deep).graph_break_count == 0
    torch._dynamo.reset()


# -- fastflow.parallel: the CFG row split ---------------------------------------------------------


def _split_worker(folder: str):
    import fastflow as ff

    torch.set_num_threads(1)
    pipe = ff.load(folder, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_parallelism(cfg=2)
    out = pipe(**dict(KW, prompt="a two"), cache="deepcache", cache_interval=2, cache_branch=1)
    return out.images.numpy(), out.stats  # numpy: torch's queue would share the storage by fd, gone with the rank


def test_the_cfg_row_split_takes_the_same_decisions(folder, sdxl):
    results = check_ranks(run_ranks(_split_worker, 2, str(folder), timeout=300))
    alone = sdxl(**dict(KW, prompt="a two"), cache="deepcache", cache_interval=2, cache_branch=1)
    for images, stats in results:
        assert stats == alone.stats
        assert _rel(torch.from_numpy(images), alone.images) < 1e-4


def test_accelerate_and_the_cli_take_deepcache(folder):
    from fastflow.cli.common import parse_cache

    assert parse_cache("deepcache:3:1") == ("deepcache:3:1", None) and parse_cache("deepcache") == ("deepcache", None)
    pipe = fastflow.accelerate(_load(folder), compile=False, cache="deepcache:2:1")
    out = pipe(**dict(KW, num_inference_steps=2))
    assert out.settings["cache"] == "deepcache:N2B1" and out.stats["blocks_computed"] == 13 + 4
    with pytest.raises(InputError, match="its cache policies: deepcache"):
        fastflow.accelerate(_load(folder), compile=False, cache="fbcache")
