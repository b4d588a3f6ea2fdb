"""fastflow.accelerate on real diffusers pipelines (FluxPipeline, StableDiffusion3Pipeline) built
from tiny random-weight folders: the transformer and the VAE decoder go through the "fastflow"
backend, the images stay those of the eager pipeline, and the rewrites happened in both."""

import numpy as np
import pytest
import torch

import fastflow
import fastflow.compile as fc

from .test_parity import SD3_W, H, W, diffusers_flux, diffusers_sd3


def _flux(folders, load):
    txt, y = load("flux-tiny-dev").text_encoder(["a handwritten seven"])
    kw = dict(prompt_embeds=txt, pooled_prompt_embeds=y, height=H, width=W, guidance_scale=3.5)
    return diffusers_flux(folders["flux-tiny-dev"], dynamic=True), kw, "qk_norm_rope"


def _sd3(folders, load):
    encoder = load("sd3.5-tiny-medium").text_encoder
    (ctx, pooled), (neg_ctx, neg_pooled) = encoder(["a cat"]), encoder([""])
    kw = dict(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_ctx,
              negative_pooled_prompt_embeds=neg_pooled, height=H, width=SD3_W, guidance_scale=4.5)  # fmt: skip
    return diffusers_sd3(folders["sd3.5-tiny-medium"]), kw, "qk_norm"


@pytest.mark.parametrize("build", [_flux, _sd3], ids=["FluxPipeline", "StableDiffusion3Pipeline"])
def test_accelerate_a_diffusers_pipeline(pipeline_folders, load, build):
    pipe, kw, attention_pattern = build(pipeline_folders, load)
    kw.update(num_inference_steps=3, output_type="np")
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        expected = pipe(generator=generator(), **kw).images
        transformer = pipe.transformer
        torch._dynamo.reset()
        fc.reset()
        assert fastflow.accelerate(pipe) is pipe and pipe.transformer is transformer
        got = pipe(generator=generator(), **kw).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    counts = fc.report()
    assert counts[attention_pattern] > 0 and counts["layernorm_modulate"] > 0  # the transformer
    assert counts["groupnorm_silu"] > 0  # the VAE decoder
