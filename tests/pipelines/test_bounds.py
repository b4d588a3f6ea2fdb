"""One argument never buys unbounded work or a silent wrong image (issue 11): steps, images per
call, seeds, scales and sizes are checked; NaN in the decode is reported; interruption is per call."""

import threading

import pytest
import torch

from fastflow import errors
from fastflow.pipelines.settings import MAX_STEPS

KW = {"height": 32, "width": 48, "num_inference_steps": 2, "output_type": "latent"}


@pytest.mark.parametrize(
    "bad",
    [
        {"num_inference_steps": 10**7},  # built 10^7 tensors (6 GB) before
        {"num_inference_steps": MAX_STEPS + 1},
        {"num_images_per_prompt": 10**7},  # tried 40 GB before
        {"num_images_per_prompt": 0},
        {"num_images_per_prompt": 1.5},
        {"seed": 2**64},  # overflowed with a traceback before
        {"seed": -2},
        {"seed": [0, 2**64]},
        {"seed": 1.5},
        {"seed": 2**64 - 1, "num_images_per_prompt": 2},  # the second image's seed overflows
        {"true_cfg_scale": float("nan")},  # silently turned guidance off before
        {"true_cfg_scale": -1.0},
        {"guidance_scale": float("inf")},
        {"height": 4096 * 4, "width": 64},
    ],
)
def test_unbounded_or_meaningless_arguments_are_refused(load, bad):
    pipe = load("flux-tiny-dev")
    with pytest.raises(errors.InputError):
        pipe("a cat", **{**KW, **bad})


def test_caps_are_documented_and_overridable(load):
    pipe = load("flux-tiny-dev")
    pipe.max_images_per_call = 2
    with pytest.raises(errors.InputError, match="max_images_per_call=2"):
        pipe("a cat", num_images_per_prompt=3, **KW)
    pipe.max_images_per_call = 3
    assert pipe("a cat", num_images_per_prompt=3, **KW).images.shape[0] == 3


def test_seed_minus_one_is_random_and_top_seed_works(load):
    pipe = load("flux-tiny-dev")
    a, b = pipe("a cat", seed=-1, **KW), pipe("a cat", seed=-1, **KW)
    assert a.seeds != b.seeds and not torch.equal(a.images, b.images)
    assert pipe("a cat", seed=2**64 - 1, **KW).seeds == [2**64 - 1]


def test_sd3_scales_are_checked(load):
    pipe = load("sd3.5-tiny-medium")
    for bad in (
        {"guidance_scale": float("nan")},
        {"guidance_scale": -3.0},
        {"skip_layer_guidance_scale": float("nan")},
    ):
        with pytest.raises(errors.InputError):
            pipe("a cat", **{**KW, "height": 32, "width": 32, **bad})


def test_max_side_follows_the_trained_size(load):
    pipe = load("flux-tiny-dev")
    assert pipe.max_side == 4 * max(pipe.default_size)


def test_nan_in_the_decode_names_the_stage(load):
    pipe = load("flux-tiny-dev")
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(errors.NumericalError, match="decoded image"):
        pipe("a cat", **{**KW, "output_type": "pt"})


def test_interrupt_is_not_lost_when_another_call_starts(load):
    """A shared flag was reset by any call starting, losing an interrupt aimed at a running one."""
    pipe = load("flux-tiny-dev")
    started, release, outcome = threading.Event(), threading.Event(), {}

    def slow_callback(i, total, latents):
        started.set()
        release.wait(30)

    def first():
        try:
            pipe("a cat", callback=slow_callback, **{**KW, "num_inference_steps": 5})
            outcome["first"] = "finished"
        except errors.GenerationInterrupted as e:
            outcome["first"] = f"interrupted at {e.step}"

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    pipe.interrupt()  # aimed at the running call
    assert pipe("a dog", **KW).images is not None  # a call that starts now is not interrupted...
    release.set()
    thread.join(60)
    assert outcome["first"] == "interrupted at 0"  # ...and does not clear the request
