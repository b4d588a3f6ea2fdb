"""pipe.enable_model_cpu_offload(): each component group moves to the execution device only for its
stage and back after, and the images do not change. No GPU here: the execution device is "cpu" and
groups wait on "cpu:0" (a different torch.device name for the same memory), so the move counter
records where each move goes."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow import errors
from fastflow.pipelines.offload import ModelOffload

KW = {"height": 24, "width": 32, "num_inference_steps": 2, "seed": 3, "output_type": "pt"}  # "pt": the VAE decodes
E, S = "exec", "storage"


@pytest.fixture
def moves(monkeypatch):
    log = []
    real = ModelOffload.move

    def move(self, name, device):
        log.append((name, E if device == self.device else S))
        real(self, name, device)

    monkeypatch.setattr(ModelOffload, "move", move)
    return log


def _offloaded(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._offload.storage = torch.device("cpu", 0)
    for name in pipe._offload.groups:
        pipe._offload.move(name, pipe._offload.storage)
    return pipe


@pytest.mark.parametrize("variant", ["flux-tiny-dev", "sd3.5-tiny-medium"])
def test_each_stage_moves_its_component_and_images_do_not_change(load, moves, variant):
    plain = load(variant)("a handwritten seven", **KW).images
    pipe = _offloaded(load(variant))
    moves.clear()
    out = pipe("a handwritten seven", **KW).images
    assert moves == [(part, where) for part in ("text", "transformer", "vae") for where in (E, S)]
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert pipe._offload.resident is None  # everything back in CPU memory after the call


def test_image_to_image_encodes_with_the_vae_between_text_and_transformer(load, moves):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    plain = load("flux-tiny-schnell")("a seven", image=image, **KW).images
    pipe = _offloaded(load("flux-tiny-schnell"))
    moves.clear()
    out = pipe("a seven", image=image, **KW).images
    order = [name for name, where in moves if where == E]
    assert order == ["text", "vae", "transformer", "vae"] and len(moves) == 8
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_prompt_embeddings_skip_the_text_encoders(load, moves):
    pipe = load("flux-tiny-dev")
    txt, y = pipe.text_encoder(["a seven"])
    _offloaded(pipe)
    moves.clear()
    pipe(prompt_embeds=txt, pooled_prompt_embeds=y, **KW)
    assert [name for name, where in moves if where == E] == ["transformer", "vae"]


def test_switches_and_errors(load):
    pipe = load("flux-tiny-schnell")
    with pytest.raises(errors.InputError, match="CUDA"):
        pipe.enable_model_cpu_offload()  # the default device is cuda; this machine has none
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe.device == torch.device("cpu")
    with pytest.raises(errors.InputError, match="disable_model_cpu_offload"):
        pipe.to("cpu")
    pipe.to(torch.float32)  # a cast alone is fine
    pipe.disable_model_cpu_offload()
    assert pipe._offload is None and pipe.to("cpu") is pipe
