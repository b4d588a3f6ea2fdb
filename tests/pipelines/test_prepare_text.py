"""The one preparation of prompts, negatives and embeddings (PromptMixin.prepare_text) that every
family parameterises: the CFG batch order, the default negative, the encoder calls."""

import pytest
import torch

from fastflow import errors
from fastflow.pipelines.prompts import Text

KW = {"height": 32, "width": 32, "num_inference_steps": 1, "output_type": "latent", "seed": 0}


def test_cfg_batch_order():
    cond = torch.ones(2, 3, 4), torch.ones(2, 5)
    uncond = torch.zeros(2, 3, 4), torch.zeros(2, 5)
    assert Text(cond).batch() == cond and Text(cond).images == 2
    first = Text(cond, uncond).batch()  # diffusers' SD3 / SDXL: [uncond ; cond]
    assert first[0][:2].sum() == 0 and first[0][2:].eq(1).all() and first[1][:2].sum() == 0
    second = Text(cond, uncond, uncond_first=False).batch()  # FLUX's true CFG: [cond ; uncond]
    assert second[0][:2].eq(1).all() and second[0][2:].sum() == 0 and second[1][2:].sum() == 0


def _spy(pipe) -> list:
    calls, te = [], pipe.text_encoder
    encode = type(te).__call__

    class Spy(type(te)):
        def __call__(self, prompts):
            calls.append(list(prompts))
            return encode(self, prompts)

    te.__class__ = Spy
    return calls


@pytest.mark.parametrize(
    "variant,cfg,expected",
    [
        ("flux-tiny-dev", {"true_cfg_scale": 2.0}, [["a", "b"], ["", ""]]),
        ("sd3.5-tiny-medium", {"guidance_scale": 3.0}, [["a", "b"], ["", ""]]),
        ("sdxl-tiny", {"guidance_scale": 3.0}, [["a", "b"]]),  # zeros: force_zeros_for_empty_prompt
    ],
)
def test_prompts_then_negatives_per_family(load, variant, cfg, expected):
    pipe = load(variant)
    calls = _spy(pipe)
    out = pipe(["a", "b"], num_images_per_prompt=2, **cfg, **KW)
    assert calls == expected and out.images.shape[0] == 4
    pipe(["c", "d"], negative_prompt="x", **cfg, **KW)  # a string negative serves every prompt
    assert calls[len(expected) :] == [["c", "d"], ["x", "x"]]


def test_flux_negative_embeddings_need_their_pooled_half(load):
    pipe = load("flux-tiny-dev")
    embeds = torch.zeros(1, 5, pipe.config.context_in_dim)
    with pytest.raises(errors.InputError, match="negative_prompt_embeds needs negative_pooled_prompt_embeds too"):
        pipe("a", negative_prompt_embeds=embeds, true_cfg_scale=2.0, **KW)
