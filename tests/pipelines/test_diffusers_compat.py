"""What a diffusers user types works the same: output types, return_dict / out[0],
callback_on_step_end, pipe.to, load()'s dtype on a CPU, and clear errors for conflicting or
mistyped arguments (before any work)."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastflow
from fastflow.errors import InputError

KW = {"height": 24, "width": 40, "num_inference_steps": 3, "seed": 1}


def test_output_types_as_diffusers(load):
    pipe = load("flux-tiny-dev")
    np_images = pipe("a cat", output_type="np", **KW).images
    assert np_images.dtype == np.float32 and np_images.shape == (1, 24, 40, 3)
    assert 0 <= np_images.min() and np_images.max() <= 1
    pil = pipe("a cat", output_type="PIL", **KW).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (40, 24)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255, np_images[0], atol=0.5 / 255 + 1e-6)
    pt = pipe("a cat", output_type="pt", **KW).images
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), np_images)


def test_return_dict_false_and_indexing(load):
    pipe = load("flux-tiny-dev")
    out = pipe("a cat", output_type="np", **KW)
    assert out[0] is out.images and out["images"] is out.images
    tup = pipe("a cat", output_type="np", return_dict=False, **KW)
    assert isinstance(tup, tuple) and len(tup) == 1
    np.testing.assert_array_equal(tup[0], out.images)


def test_callback_on_step_end_sees_and_may_replace_the_latents(load):
    pipe = load("sd3.5-tiny-medium")
    seen = []

    def on_step_end(p, i, t, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((i, float(t), kwargs["latents"].shape))
        if i == 2:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return kwargs

    kw = {**KW, "width": 32, "guidance_scale": 1.0}
    out = pipe("a cat", output_type="latent", callback_on_step_end=on_step_end, **kw).images
    assert [i for i, _, _ in seen] == [0, 1, 2] and seen[0][1] == pytest.approx(1000.0)
    assert seen[0][1] > seen[1][1] > seen[2][1]  # t = sigma * 1000, decreasing
    assert torch.count_nonzero(out) == 0  # the replaced state is what the loop returns
    with pytest.raises(InputError, match="must return a dict"):
        pipe("a cat", output_type="latent", callback_on_step_end=lambda *a: 3, **kw)
    with pytest.raises(InputError, match="only 'latents'"):
        pipe("a cat", callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)


def test_pipe_to_and_the_cpu_default_dtype(pipeline_folders):
    pipe = fastflow.load(pipeline_folders["flux-tiny-dev"], device="cpu")
    assert pipe.transformer.dtype == torch.float32  # float32 on a CPU, as the CLI
    assert pipe.to(torch.bfloat16) is pipe and pipe.transformer.dtype == pipe.vae.dtype == torch.bfloat16
    assert pipe.text_encoder.clip_l.model.dtype == torch.bfloat16
    pipe.to("cpu", torch.float32)
    assert pipe.transformer.dtype == torch.float32
    with pytest.warns(UserWarning, match="T5 overflows"):
        pipe.to(torch.float16)
    assert pipe.text_encoder.t5.model.dtype == torch.float32 and pipe.transformer.dtype == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            pipe.to("cuda")
    with pytest.raises(InputError, match="not a device"):
        pipe.to("gpu0")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"prompt": "a cat", "prompt_embeds": torch.zeros(1, 4, 48), "pooled_prompt_embeds": torch.zeros(1, 32)},
         "pass prompt or prompt_embeds, not both"),
        ({"prompt": "a cat", "seed": 3, "generator": torch.Generator()}, "pass seed or generator, not both"),
        ({"prompt": 123}, "prompt must be a string or a non-empty list of strings, got 123"),
        ({"prompt": "a cat", "generator": 5}, "generator must be a torch.Generator"),
        ({"prompt": "a cat", "latents": [[0.0]]}, "latents must be a torch.Tensor"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"], "true_cfg_scale": 2.0},
         "3 negative prompts for 2 prompts"),
    ],
    ids=["prompt+embeds", "seed+generator", "prompt-int", "generator-int", "latents-list", "negatives"],
)  # fmt: skip
def test_argument_errors_are_input_errors(load, kwargs, message):
    pipe = load("flux-tiny-dev")
    with pytest.raises(InputError, match=message):
        pipe(height=24, width=40, num_inference_steps=1, **kwargs)


def test_sd3_negative_prompt_list_of_the_wrong_length(load):
    pipe = load("sd3.5-tiny-medium")
    with pytest.raises(InputError, match="1 negative prompts for 2 prompts"):
        pipe(["a", "b"], negative_prompt=["x"], height=32, width=32, num_inference_steps=1)
