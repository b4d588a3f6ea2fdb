"""Region-adaptive sampling (issue 37): ratio 1 is the uncached result bit for bit; the kept tokens
run as a smaller image (RoPE / position embedding follow them); the selection metric and its
starvation term; composition with block policies, CFG, image-to-image, Kontext, LoRA, FP8 and
compiled blocks; bad input; the families without a token loop."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow import errors
from fastflow.caching import RAS, DBCache, FBCache, Schedule, TaylorSeer, TeaCache, resolve_cache
from fastflow.caching.ras import TokenMemory, check_family, resolve, token_metric

STEPS = 10
FLUX = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 6, "output_type": "latent", "seed": 0}
SD3 = {"prompt": "a cat", "negative_prompt": "blur", "height": 32, "width": 32, "num_inference_steps": 6,
       "guidance_scale": 4.5, "output_type": "latent", "seed": 0}  # fmt: skip


def _digits(pipe, **kw):
    kw = {"prompt": ["a handwritten seven", "number two"], "seed": 5, "num_inference_steps": STEPS,
          "output_type": "latent", **kw}  # fmt: skip
    return pipe(**kw)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("policy", [{"cache": "ras", "ras_ratio": 1.0}, {"cache": RAS(1.0, warmup=1)},
                                    {"cache": "fbcache", "cache_threshold": 0.0, "ras_ratio": 1.0}],
                         ids=["ras", "object", "with-fbcache"])  # fmt: skip
def test_ratio_one_is_bit_identical_on_the_digits_model(digits, policy):
    base, out = _digits(digits), _digits(digits, **policy)
    assert torch.equal(out.images, base.images)
    assert out.stats == base.stats and out.settings["cache"].startswith("ras:1")


@pytest.mark.parametrize("variant, call", [("flux-tiny-dev", FLUX), ("sd3.5-tiny-medium", SD3)], ids=["flux", "sd3"])
def test_ratio_one_is_bit_identical_on_tiny_flux_and_sd3(load, variant, call):
    pipe = load(variant)
    base, out = pipe(**call), pipe(**call, cache="ras", ras_ratio=1)
    assert torch.equal(out.images, base.images) and out.stats == base.stats
    half = pipe(**call, cache="ras", ras_ratio=0.5)  # the same pipe still differs at a real ratio
    assert not torch.equal(half.images, base.images) and half.stats["work_saved"] > 0


def test_ras_saves_fractional_block_work_close_to_the_uncached_result(digits):
    base = _digits(digits)
    out = _digits(digits, cache="ras", ras_ratio=0.5)
    n = digits.transformer.num_blocks
    # warmup 4 + the last step run every token; 5 RAS steps run 8 of 16 image tokens with 8 text tokens
    text, k, tokens = 8, 8, 16
    expected = n * (5 + 5 * (text + k) / (text + tokens))
    assert out.stats["blocks_computed"] == pytest.approx(expected, rel=1e-4)
    assert out.stats["blocks_total"] == n * STEPS and 0 < out.stats["work_saved"] < 0.5
    assert 0 < _rel(out.images, base.images) < 0.5
    full = _digits(digits, cache=RAS(0.5, warmup=2, full_every=2))  # error-reset steps: more work
    assert full.stats["blocks_computed"] > out.stats["blocks_computed"] - n  # (one fewer warmup step)


def test_flux_kept_tokens_run_as_a_smaller_image(load):
    """embed(tokens=) + blocks + final equals the model on just those tokens and their position ids:
    the RoPE tables follow the selection and the tokens attend to each other and the text."""
    model = load("flux-tiny-dev").transformer
    g = torch.Generator().manual_seed(0)
    c = model.config
    img, txt = torch.randn(1, 16, c.in_channels, generator=g), torch.randn(1, 5, c.context_in_dim, generator=g)
    y, t, guidance = torch.randn(1, c.vec_in_dim, generator=g), torch.tensor([0.7]), torch.tensor([3.5])
    from fastflow.models.flux import make_img_ids

    ids = make_img_ids(4, 4)
    keep = torch.tensor([1, 4, 6, 7, 13])
    with torch.no_grad():
        state = model.embed(img, txt, y, t, ids, guidance=guidance, tokens=keep)
        selected = model.final(model.blocks(state))
        alone = model(img[:, keep], txt, y, t, ids[keep], guidance=guidance)
        everything = model(img, txt, y, t, ids, guidance=guidance)
    assert selected.shape == (1, 5, c.out_channels) and torch.equal(selected, alone)
    assert not torch.allclose(selected, everything[:, keep])  # the dropped tokens are not attended to


def test_sd3_kept_tokens_carry_their_position_embedding(load):
    model = load("sd3.5-tiny-medium").transformer
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)
    ctx, y = torch.randn(1, 6, c.context_in_dim, generator=g), torch.randn(1, c.adm_in_dim, generator=g)
    keep = torch.tensor([0, 3, 9, 15])
    with torch.no_grad():
        whole = model.embed(x, torch.tensor([500.0]), ctx, y)
        part = model.embed(x, torch.tensor([500.0]), ctx, y, tokens=keep)
        assert torch.equal(part.x, whole.x[:, keep]) and torch.equal(part.tokens, keep)
        out = model.final(model.blocks(part))  # (blocks run in place on the state)
    assert out.shape == (1, 4, c.patch_size**2 * c.out_channels)  # per-token outputs, not unpatchified


def test_metric_is_the_channel_std_per_pixel_and_starvation_brings_tokens_back():
    out = torch.zeros(2, 6, 4 * 3)  # FLUX layout: 3 channels x 4 pixels per token
    out[0, 2] = torch.arange(12.0)  # token 2 varies most in image 0
    out[1, 4] = torch.arange(12.0) * 0.5  # token 4 in image 1
    metric = token_metric(out.view(2, 6, 3, 4).transpose(-1, -2).reshape(2, 6, 12), pixels=4)
    assert metric.argmax() == 2 and metric[4] > 0 and metric[[0, 1, 3, 5]].eq(0).all()
    ras = RAS(0.5, starvation=1.0)
    dropped = torch.zeros(6)
    assert ras.select(out, dropped, 4, 2).tolist() == [2, 4]
    dropped[0] = 30.0  # dropped often: its (tiny) metric times exp(30) wins a place
    out[:, 0] = 1e-6 * torch.arange(12.0)
    assert 0 in ras.select(out, dropped, 4, 2).tolist()


def test_token_memory_reads_and_writes_residuals_at_the_kept_tokens():
    store = {"rest": {"img": torch.zeros(1, 5, 2), "txt": torch.ones(1, 3, 2)}, "n": 3}
    view = TokenMemory(store, {"img": torch.tensor([1, 3]), "txt": None})
    assert view["rest"]["img"].shape == (1, 2, 2) and view["rest"]["txt"].shape == (1, 3, 2)
    view["rest"] = {"img": torch.full((1, 2, 2), 7.0), "txt": torch.full((1, 3, 2), 2.0)}
    assert store["rest"]["img"][0, :, 0].tolist() == [0, 7, 0, 7, 0] and store["rest"]["txt"].eq(2).all()
    assert view.get("n") == 3 and view.get("missing") is None and "rest" in view


def test_ras_composes_with_block_policies(digits):
    base = _digits(digits)
    mask = [[1, 1, 1, 1]] + [[1, 0, 0, 1] if i % 2 else [1, 1, 1, 1] for i in range(STEPS - 1)]
    alone = _digits(digits, cache="ras", ras_ratio=0.5)
    sched = _digits(digits, cache=Schedule(mask), ras_ratio=0.5)
    assert sched.settings["cache"].startswith("ras:0.5") and "+schedule" in sched.settings["cache"]
    assert sched.stats["blocks_computed"] < alone.stats["blocks_computed"]
    assert 0 < _rel(sched.images, base.images) < 0.6
    db = _digits(digits, cache=RAS(0.75, blocks=DBCache(1, 1, 0.3)))
    assert db.stats["work_saved"] > 0 and torch.isfinite(db.images).all()
    # a schedule searched with RAS on (tune-cache --ras) runs with it
    assert isinstance(resolve(Schedule(mask, info={"ras_ratio": 0.25}), None), RAS)


def test_ras_composes_with_cfg_img2img_kontext_lora_and_fp8(load, pipeline_folders, tmp_path):
    from ..conftest import tiny_diffusers_flux
    from .test_lora import FLUX_MODULES, _diffusers_lora, _save

    pipe = load("flux-tiny-dev")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    calls = {
        "true cfg": dict(FLUX, true_cfg_scale=2.0, negative_prompt="blur", num_images_per_prompt=2),
        "img2img": dict(FLUX, image=image, strength=0.8, num_inference_steps=8),
    }
    lora = _save(tmp_path, "lora", _diffusers_lora(tiny_diffusers_flux("flux-tiny-dev"), FLUX_MODULES, 7))
    for name, call in calls.items():
        base, out = pipe(**call), pipe(**call, cache="ras", ras_ratio=0.5)
        assert out.images.shape == base.images.shape and torch.isfinite(out.images).all(), name
        assert out.stats["work_saved"] > 0, name
        assert torch.equal(pipe(**call, cache="ras", ras_ratio=1.0).images, base.images), name
    pipe.load_lora(str(lora), scale=0.8, name="l")
    with_lora = pipe(**FLUX, cache="ras", ras_ratio=0.5)
    assert torch.equal(pipe(**FLUX, cache="ras", ras_ratio=1.0).images, pipe(**FLUX).images)
    pipe.unload_lora()
    assert not torch.equal(with_lora.images, pipe(**FLUX, cache="ras", ras_ratio=0.5).images)
    fp8 = load("flux-tiny-dev", quant="fp8")
    assert torch.equal(fp8(**FLUX, cache="ras", ras_ratio=1.0).images, fp8(**FLUX).images)
    assert fp8(**FLUX, cache="ras", ras_ratio=0.5).stats["work_saved"] > 0
    kontext = load("flux-tiny-kontext")
    kw = {"image": image, "num_inference_steps": 6, "output_type": "latent", "seed": 1, "auto_resize": False}
    base, out = kontext("make it red", **kw), kontext("make it red", cache="ras", ras_ratio=0.5, **kw)
    assert out.images.shape == base.images.shape and out.stats["work_saved"] > 0
    assert torch.equal(kontext("make it red", cache="ras", ras_ratio=1.0, **kw).images, base.images)


def test_compiled_blocks_run_ras_without_graph_breaks(load):
    pipe = load("flux-tiny-dev")
    base = pipe(**FLUX, cache=RAS(0.5, warmup=2))
    for block in list(pipe.transformer.double_blocks) + list(pipe.transformer.single_blocks):
        block.compile(backend="aot_eager", fullgraph=True)  # a graph break inside a block raises
    out = pipe(**FLUX, cache=RAS(0.5, warmup=2))
    torch.testing.assert_close(out.images, base.images)
    sd3 = load("sd3.5-tiny-medium")
    base = sd3(**SD3, cache=RAS(0.5, warmup=2))
    for block in sd3.transformer.joint_blocks:
        block.compile(backend="aot_eager", fullgraph=True)
    out = sd3(**SD3, cache=RAS(0.5, warmup=2)).images  # (aot_eager's own rounding: 1e-5 of the latents)
    torch.testing.assert_close(out, base.images, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache": "ras", "ras_ratio": 0}, r"\(0, 1\]"),
        ({"cache": "ras", "ras_ratio": 1.5}, r"\(0, 1\]"),
        ({"cache": "ras", "ras_ratio": float("nan")}, r"\(0, 1\]"),
        ({"cache": "ras", "ras_ratio": "half"}, r"\(0, 1\]"),
        ({"cache": None, "ras_ratio": 0.5}, "needs cache='ras'"),
        ({"cache": "ras", "threshold": 0.1}, "no threshold"),
        ({"cache": TeaCache(0.2), "ras_ratio": 0.5}, "fbcache, dbcache"),
        ({"cache": TaylorSeer(), "ras_ratio": 0.5}, "fbcache, dbcache"),
    ],
)
def test_bad_ras_arguments_are_input_errors(kwargs, match):
    with pytest.raises(errors.InputError, match=match):
        resolve_cache(kwargs["cache"], kwargs.get("threshold"), kwargs.get("ras_ratio"))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"warmup": 0}, "warmup"), ({"full_every": -1}, "full_every"), ({"warmup": 1.5}, "warmup"),
     ({"starvation": -1.0}, "starvation"), ({"ratio": 0.0}, r"\(0, 1\]"), ({"blocks": "fbcache"}, "composes")],
)  # fmt: skip
def test_bad_ras_policies_are_input_errors(kwargs, match):
    with pytest.raises(errors.InputError, match=match):
        RAS(**kwargs)


def test_families_without_a_token_loop_refuse_ras(load):
    pipe = load("sdxl-tiny")
    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "latent"}
    for cache in ("ras", RAS(0.5)):
        with pytest.raises(errors.InputError, match="sdxl family.*deepcache"):
            pipe("a cat", cache=cache, **kw)
    with pytest.raises(errors.InputError, match="sdxl family"):
        pipe("a cat", cache="fbcache", ras_ratio=0.5, **kw)

    class Video(torch.nn.Module):
        pass

    config = type("C", (), {"family": "svd"})()
    with pytest.raises(errors.InputError, match="svd family.*deepcache"):
        check_family(RAS(0.5), Video(), config)
    check_family(FBCache(0.1), Video(), config)  # not RAS: left to the template's own check


def test_tune_cache_searches_with_ras_on(tmp_path, digits):
    import json

    from fastflow.cli import main

    out = tmp_path / "schedules"
    args = ["tune-cache", "--steps", "6", "--images-per-prompt", "1", "--population", "3", "--generations", "1"]
    assert main([*args, "--ras", "0.5", "-o", str(out)]) == 0
    files = sorted(out.glob("*-ras0.5-*.json"))
    assert files and json.loads(files[0].read_text())["ras_ratio"] == 0.5
    run = _digits(digits, cache=str(files[0]), num_inference_steps=6)
    assert run.settings["cache"].startswith("ras:0.5") and "+schedule" in run.settings["cache"]
    assert main([*args, "--ras", "2", "-o", str(out)]) != 0  # the CLI reports the InputError
