"""RAS under context parallelism (issue 37): 2 CPU gloo ranks (Ulysses for FLUX, Ring for SD3 with
CFG) select the same tokens at every step as one process does, and end with its latents."""

from __future__ import annotations

import torch

from ..dist_util import check_ranks, run_ranks

FLUX = {"prompt": "a seven", "height": 28, "width": 20, "num_inference_steps": 6, "seed": 5}  # 35 image tokens
SD3 = {"prompt": "a four", "negative_prompt": "blur", "height": 32, "width": 32, "num_inference_steps": 6,
       "guidance_scale": 4.0, "seed": 3}  # fmt: skip


def _worker(folders: dict):
    import fastflow
    from fastflow.caching import RAS

    class Recording(RAS):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.chosen = []

        def select(self, *args):
            index = super().select(*args)
            self.chosen.append(index.tolist())
            return index

    out = {}
    for name, variant, sizes, call in (
        ("flux ulysses", "flux-tiny-dev", {"ulysses": 2}, FLUX),
        ("sd3 ring cfg", "sd3.5-tiny-medium", {"ring": 2}, SD3),
    ):
        pipe = fastflow.load(folders[variant], device="cpu", dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        one, split = Recording(0.5, warmup=2), Recording(0.5, warmup=2)
        single = pipe(**call, cache=one, output_type="latent")
        pipe.enable_parallelism(**sizes)
        try:
            parallel = pipe(**call, cache=split, output_type="latent")
            try:
                pipe(**call, cache=RAS(0.5, warmup=2, blocks=fastflow.caching.FBCache(0.1)), output_type="latent")
                refused = "accepted"
            except fastflow.errors.InputError as e:
                refused = str(e)
        finally:
            pipe.disable_parallelism()
        rel = float((parallel.images - single.images).norm() / single.images.norm())
        out[name] = {"rel": rel, "chosen": (one.chosen, split.chosen), "stats": (single.stats, parallel.stats),
                     "latents": parallel.images.numpy().tobytes(), "refused": refused}  # fmt: skip
    return out


def test_ras_takes_the_same_decisions_on_every_rank_as_one_process(pipeline_folders):
    folders = {k: str(v) for k, v in pipeline_folders.items()}
    results = check_ranks(run_ranks(_worker, 2, folders, timeout=600))
    for rank, res in enumerate(results):
        for name, r in res.items():
            single, split = r["chosen"]
            assert single and split == single, (rank, name)
            assert r["rel"] <= 1e-5, (rank, name, r["rel"])
            assert r["stats"][0] == r["stats"][1] and r["stats"][0]["work_saved"] > 0, (rank, name)
            assert "split over ranks" in r["refused"], (rank, name)
            assert r["latents"] == results[0][name]["latents"], (rank, name)  # the same bytes everywhere
