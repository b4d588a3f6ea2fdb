"""ControlNets under a parallel split (issue 35: "control residuals follow the sequence shards"), on
the CPU with gloo: 2 and 4 ranks spawned by the test. FLUX nets split their tokens like the base
model (a union net runs whole and its residuals are cut), SD3 / SDXL nets their rows; the base
model's wrapped ``blocks`` / ``forward`` takes those residuals, or cuts whole ones. Each rank's
latents must equal the one-process run with the same ControlNets (fp32, <= 1e-5 relative) for FLUX
(Ulysses, Ring, both, a union net with control_mode, two nets, true CFG over cfg x ulysses and cfg x
data, FBCache), SD3 (cfg x ulysses) and SDXL (cfg), every rank ending with the same latents and a
cache taking the same decisions as one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ..dist_util import check_ranks, run_ranks

FLUX_H, FLUX_W = 28, 20  # 7 x 5 = 35 image tokens: uneven over 2 and 4 ranks
SD3_H, SD3_W = 24, 32  # 6 x 8 patches
SDXL_H, SDXL_W = 32, 48


TOKENS, CUT, ROWS = ("FluxNetSharding", True), ("FluxNetSharding", False), ("RowNetSharding", None)


def _kind(net):
    s = net.__dict__.get("_fastflow_sharding")
    return None if s is None else (type(s).__name__, getattr(s, "split", None))


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _scenarios(world: int):
    """(name, pipeline, parallel sizes, call arguments, how each net is split: (kind, tokens split) or None)."""
    flux = {"prompt": "a seven", "height": FLUX_H, "width": FLUX_W, "num_inference_steps": 3, "seed": 5,
            "control_image": "FLUX0", "controlnet_conditioning_scale": 0.9}  # fmt: skip
    union = dict(flux, control_mode=2)
    two = dict(flux, control_image=["FLUX0", "FLUX1"], controlnet_conditioning_scale=[0.6, 1.1],
               control_guidance_end=[0.5, 1.0], control_mode=[None, 1])  # fmt: skip
    sd3 = {"prompt": "a four", "negative_prompt": "blur", "height": SD3_H, "width": SD3_W, "num_inference_steps": 3,
           "guidance_scale": 4.0, "seed": 3, "control_image": "SD3", "controlnet_conditioning_scale": 0.8}  # fmt: skip
    sdxl = {"prompt": "a two", "height": SDXL_H, "width": SDXL_W, "num_inference_steps": 2, "guidance_scale": 5.0,
            "seed": 1, "control_image": "SDXL", "controlnet_conditioning_scale": 0.7}  # fmt: skip
    if world == 2:
        return [
            ("flux ulysses", "flux-a", {"ulysses": 2}, flux, [TOKENS]),
            ("flux ring union", "flux-union", {"ring": 2}, union, [CUT]),  # union: run whole, cut
            ("flux ulysses two nets", "flux-two", {"ulysses": 2}, two, [TOKENS, CUT]),
            ("flux ulysses fbcache", "flux-a", {"ulysses": 2},
             dict(flux, num_inference_steps=8, cache="fbcache", cache_threshold=0.95), [TOKENS]),  # skips 20 of 48
            ("sdxl cfg", "sdxl", {"cfg": 2}, sdxl, [ROWS]),
        ]  # fmt: skip
    return [
        ("flux usp two nets", "flux-two", {"ulysses": 2, "ring": 2}, two, [TOKENS, CUT]),
        ("flux true-cfg cfg x ulysses", "flux-a", {"cfg": 2, "ulysses": 2},
         dict(flux, true_cfg_scale=2.0, negative_prompt="x"), [TOKENS]),
        ("flux cfg x data", "flux-two", {"cfg": 2, "data": 2},
         dict(two, true_cfg_scale=2.0, negative_prompt="x", num_images_per_prompt=2), [None, None]),  # rows only
        ("sd3 cfg x ulysses", "sd3", {"cfg": 2, "ulysses": 2}, sd3, [ROWS]),
    ]  # fmt: skip


def _worker(folders: dict, images: dict):
    import torch.distributed as dist

    import fastflow

    rank, world = dist.get_rank(), dist.get_world_size()
    nets = {"flux-a": ["cn-a"], "flux-union": ["cn-union"], "flux-two": ["cn-a", "cn-union"], "sd3": ["cn-sd3"],
            "sdxl": ["cn-sdxl"]}  # fmt: skip
    base = {"flux-a": "flux", "flux-union": "flux", "flux-two": "flux", "sd3": "sd3", "sdxl": "sdxl"}
    results = {}
    for name, variant, sizes, call, _ in _scenarios(world):
        paths = [folders[n] for n in nets[variant]]
        pipe = fastflow.load(folders[base[variant]], device="cpu", dtype=torch.float32,
                             controlnet=paths if len(paths) > 1 else paths[0])  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        c = {
            k: ([images[i] for i in v] if k == "control_image" and isinstance(v, list) else v) for k, v in call.items()
        }
        if isinstance(c["control_image"], str):
            c["control_image"] = images[c["control_image"]]
        try:
            single = pipe(**c, output_type="latent")
            scale = c["controlnet_conditioning_scale"]
            zero = [0.0] * len(scale) if isinstance(scale, list) else 0.0
            plain = pipe(**dict(c, controlnet_conditioning_scale=zero), output_type="latent")  # = no ControlNet
            pipe.enable_parallelism(**sizes)
            split = pipe(**c, output_type="latent")
            split_nets = [_kind(net) for net in pipe.controlnets]
            pipe.disable_parallelism()
            left = [net for net in pipe.controlnets if net.__dict__.keys() & {"forward", "_fastflow_sharding"}]
        except Exception as e:
            raise RuntimeError(f"scenario {name!r} on rank {rank}") from e
        every = [None] * world
        dist.all_gather_object(every, split.images)
        results[name] = {
            "rel": _rel(split.images, single.images),
            "control_effect": _rel(single.images, plain.images),
            "same_latents": all(torch.equal(e, split.images) for e in every),
            "stats": (split.stats, single.stats),
            "parallel": split.settings.get("parallel"),
            "controlnet": (split.settings.get("controlnet"), single.settings.get("controlnet")),
            "nets": split_nets,
            "unwrapped": not left,
        }
    # a user's generators must agree over the ranks (the encodings draw from them on each rank)
    from fastflow.errors import ParallelError

    c = {k: v for k, v in c.items() if k != "seed"}
    pipe.enable_parallelism(**sizes)
    try:
        pipe(**c, generator=torch.Generator().manual_seed(rank), output_type="latent")
        results["differing generators"] = "ran"
    except ParallelError as e:
        results["differing generators"] = str(e)
    alike = pipe(**c, generator=torch.Generator().manual_seed(9), output_type="latent").images
    pipe.disable_parallelism()
    one = pipe(**c, generator=torch.Generator().manual_seed(9), output_type="latent").images
    results["same generators"] = _rel(alike, one)
    return results


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    from ..conftest import tiny_diffusers_flux, tiny_pipeline_folder
    from .test_controlnet import sd3_controlnet, sdxl_controlnet
    from .test_controlnet_flux import flux_controlnet

    root = tmp_path_factory.mktemp("parallel-control")
    flux = tiny_pipeline_folder(root / "flux", "flux-tiny-dev")
    # 3 double / 3 single blocks for 2-block nets: block i takes residual i // 2 (several blocks per residual)
    transformer = tiny_diffusers_flux("flux-tiny-dev", 0, depth=3, depth_single_blocks=3)
    transformer.save_pretrained(flux / "transformer")
    flux_controlnet(transformer, 11).save_pretrained(root / "cn-a")
    flux_controlnet(transformer, 12, num_mode=4).save_pretrained(root / "cn-union")
    sd3 = tiny_pipeline_folder(root / "sd3", "sd3.5-tiny-medium")
    sd3_controlnet(sd3, 12).save_pretrained(root / "cn-sd3")
    sdxl = tiny_pipeline_folder(root / "sdxl", "sdxl-tiny")
    sdxl_controlnet(sdxl, 10).save_pretrained(root / "cn-sdxl")
    folders = {
        "flux": flux,
        "sd3": sd3,
        "sdxl": sdxl,
        **{k: root / k for k in ("cn-a", "cn-union", "cn-sd3", "cn-sdxl")},
    }
    images = {}
    for i, (name, (h, w)) in enumerate(
        {"FLUX0": (FLUX_H, FLUX_W), "FLUX1": (FLUX_H, FLUX_W), "SD3": (SD3_H, SD3_W), "SDXL": (SDXL_H, SDXL_W)}.items()
    ):
        rng = np.random.default_rng(i)
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h + 5, w + 3, 3), dtype=np.uint8)).save(path)  # resized
        images[name] = str(path)
    return {k: str(v) for k, v in folders.items()}, images


@pytest.mark.parametrize("world", [2, 4])
def test_split_controlnet_generations_equal_the_single_process_run(world, files):
    results = check_ranks(run_ranks(_worker, world, *files, timeout=900))
    expected_nets = {s[0]: s[4] for s in _scenarios(world)}
    for rank, res in enumerate(results):
        assert "differ between ranks" in res.pop("differing generators"), rank
        assert res.pop("same generators") <= 1e-5, rank
        assert set(res) == set(expected_nets)
        for name, r in res.items():
            assert r["nets"] == expected_nets[name], (rank, name, r["nets"])  # each rank computes its share
            assert r["unwrapped"], (rank, name)  # disable_parallelism gives the nets back as they were
            assert r["rel"] <= 1e-5, (rank, name, r["rel"])
            assert r["control_effect"] > 1e-3, (rank, name, r["control_effect"])  # the residuals matter
            assert r["same_latents"], (rank, name)
            assert r["stats"][0] == r["stats"][1], (rank, name, r["stats"])  # the same cache decisions
            assert r["parallel"] not in (None, "none"), (rank, name)
            assert r["controlnet"][0] == r["controlnet"][1] is not None, (rank, name)
            if "fbcache" in name:
                assert r["stats"][0]["blocks_computed"] < r["stats"][0]["blocks_total"], r["stats"]  # it skipped


def test_base_model_takes_whole_or_cut_residuals_and_refuses_others():
    """Whole residuals are cut to this rank's rows and tokens, a split net's cut ones are taken as they
    are, and any other shape is refused, never silently misapplied."""
    from fastflow.errors import ParallelError
    from fastflow.parallel.shard import Shard

    shard = Shard(b=3, real_rows=1, txt=(0, 4), img=(3, 6), img_lengths=[3, 3], n_img=6, rows=slice(1, 2))
    whole = torch.arange(3 * 6 * 2.0).view(3, 6, 2)
    mine = whole[1:2, 3:6]
    for given in (whole, whole[1:2], whole[:, 3:6], mine):
        (local,) = shard.residuals([given], "controls")
        assert torch.equal(local, mine)
    with pytest.raises(ParallelError, match="whole batch"):
        shard.residuals([whole[:2]], "controls")
    with pytest.raises(ParallelError, match="6 image tokens"):
        shard.residuals([whole[:, :4]], "controls")
    assert shard.residuals(None, "controls") is None
