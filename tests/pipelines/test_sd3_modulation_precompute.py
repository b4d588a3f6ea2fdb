"""Modulation precompute in the SD3 pipeline: CFG's doubled batch and skip-layer guidance's
conditional-only forwards all read their adaLN rows from one table computed before the loop."""

import torch

import fastflow

from ..models.test_modulation_precompute import _modulation_weights, _WeightReads


def test_sd3_images_unchanged_and_modulation_weights_read_once(pipeline_folders):
    pipe = fastflow.load(pipeline_folders["sd3.5-tiny-medium"], device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    weights = _modulation_weights(pipe.transformer)
    assert len(weights) == 2 * pipe.transformer.config.depth + 1  # x and context blocks, final layer
    kwargs = dict(
        height=32,
        width=32,
        num_inference_steps=3,
        guidance_scale=4.5,
        skip_guidance_layers=[1],
        skip_layer_guidance_start=0.0,
        skip_layer_guidance_stop=1.0,
        output_type="pt",
        seed=0,
    )
    runs = {}
    for precompute in (False, True):
        pipe.defaults["precompute_modulation"] = precompute
        with _WeightReads(weights) as reads:
            images = pipe("a cat", **kwargs).images
        runs[precompute] = images, reads.calls
    (per_step, per_step_reads), (pre, pre_reads) = runs[False], runs[True]
    # per step the CFG pair, and on the steps where it is active the SLG forward (skipping block 1)
    assert set(per_step_reads) == {"linear"} and per_step_reads["linear"] > 3 * len(weights)
    assert pre_reads == {"baddbmm": len(weights)}
    torch.testing.assert_close(pre, per_step, rtol=0, atol=2e-6)
