"""Each family's ``__call__`` takes exactly the arguments (names, order, defaults, annotations) it
took when every family spelled out its own list: positional calls, keyword calls, help() and
``inspect.signature`` (which tuning.fine_trajectory reads for defaults) see the same function."""

import inspect

import pytest
import torch

from fastflow import errors
from fastflow.pipelines import FluxPipeline, SD3Pipeline, SDXLPipeline

E = inspect.Parameter.empty
TENSOR = "torch.Tensor | None"
PROMPTS = [("prompt", None, E), ("negative_prompt", None, E)]
SAMPLING = [
    ("height", None, "int | None"),
    ("width", None, "int | None"),
    ("num_inference_steps", None, "int | None"),
    ("guidance_scale", None, "float | None"),
    ("num_images_per_prompt", 1, "int"),
    ("seed", None, E),
    ("generator", None, E),
    ("sampler", None, "str | None"),
    ("output_type", "pil", "str"),
    ("callback", None, E),
    ("prompt_embeds", None, TENSOR),
    ("pooled_prompt_embeds", None, TENSOR),
]
NEGATIVE_EMBEDS = [("negative_prompt_embeds", None, TENSOR), ("negative_pooled_prompt_embeds", None, TENSOR)]
STEP_END = [
    ("return_dict", True, "bool"),
    ("callback_on_step_end", None, E),
    ("callback_on_step_end_tensor_inputs", ("latents",), E),
]
CACHE = [("cache", None, E), ("cache_threshold", None, "float | None"), ("ras_ratio", None, "float | None")]
DEEPCACHE = [("cache_interval", None, "int | None"), ("cache_branch", None, "int | None")]  # issue 37: UNets
LATENTS, PROGRESS, SIGMAS = ("latents", None, TENSOR), ("progress", None, "bool | None"), ("sigmas", None, E)
IMAGE, STRENGTH = ("image", None, E), ("strength", None, "float | None")
INPAINT = [("mask_image", None, E), ("padding_mask_crop", None, "int | None")]  # issue 35
CONTROLNET = [  # issue 35: ControlNets (SD3, SDXL)
    ("control_image", None, E),
    ("controlnet_conditioning_scale", 1.0, "float | list[float]"),
    ("control_guidance_start", 0.0, "float | list[float]"),
    ("control_guidance_end", 1.0, "float | list[float]"),
]

EXPECTED = {
    FluxPipeline: [
        *PROMPTS,
        IMAGE,
        *SAMPLING,
        LATENTS,
        ("auto_resize", True, "bool"),
        PROGRESS,
        *CACHE,
        SIGMAS,
        ("true_cfg_scale", None, "float | None"),
        STRENGTH,
        *NEGATIVE_EMBEDS,
        *STEP_END,
        *INPAINT,  # inpainting (dev / schnell) and FLUX.1 Fill
        *CONTROLNET,  # FLUX.1 Canny / Depth (control_image); FLUX ControlNets
        ("control_mode", None, "int | list[int] | None"),  # union ControlNets
    ],
    SD3Pipeline: [
        *PROMPTS,
        *SAMPLING,
        *NEGATIVE_EMBEDS,
        LATENTS,
        ("skip_guidance_layers", None, "list[int] | None"),
        ("skip_layer_guidance_scale", 2.8, "float"),
        ("skip_layer_guidance_start", 0.01, "float"),
        ("skip_layer_guidance_stop", 0.2, "float"),
        IMAGE,
        STRENGTH,
        PROGRESS,
        *CACHE,
        SIGMAS,
        *STEP_END,
        *INPAINT,
        *CONTROLNET,
    ],
    SDXLPipeline: [
        *PROMPTS,
        *SAMPLING,
        *NEGATIVE_EMBEDS,
        LATENTS,
        ("original_size", None, "tuple[int, int] | None"),
        ("crops_coords_top_left", (0, 0), "tuple[int, int]"),
        ("target_size", None, "tuple[int, int] | None"),
        ("negative_original_size", None, "tuple[int, int] | None"),
        ("negative_crops_coords_top_left", None, "tuple[int, int] | None"),
        ("negative_target_size", None, "tuple[int, int] | None"),
        PROGRESS,
        *STEP_END,
        IMAGE,
        STRENGTH,
        SIGMAS,
        *CACHE,
        *DEEPCACHE,
        *INPAINT,
        *CONTROLNET,
    ],
}
FAMILIES = list(EXPECTED)


def _params(signature: inspect.Signature) -> list[tuple]:
    return [(p.name, p.default, p.annotation) for p in signature.parameters.values()]


def _bare(cls):
    """An instance whose generate hands back the request (and whether autograd was on)."""
    pipe = cls.__new__(cls)
    pipe.generate = lambda **request: (request, torch.is_grad_enabled())
    return pipe


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_signature_names_order_defaults_and_annotations(cls):
    signature = inspect.signature(cls.__call__)
    assert _params(signature) == [("self", E, E), *EXPECTED[cls]]
    assert {p.kind for p in signature.parameters.values()} == {inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert signature.return_annotation == "PipelineOutput"
    bound = inspect.signature(_bare(cls).__call__)  # as tuning.fine_trajectory reads it
    assert _params(bound) == EXPECTED[cls]


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_call_hands_every_argument_to_generate(cls):
    request, grad = _bare(cls)()
    assert request == {name: default for name, default, _ in EXPECTED[cls]}
    assert not grad  # __call__ runs without autograd (generate adds inference_mode)
    request, _ = _bare(cls)("a cat", "blurry", num_inference_steps=3)
    assert (request["prompt"], request["negative_prompt"], request["num_inference_steps"]) == ("a cat", "blurry", 3)
    third = EXPECTED[cls][2][0]  # "image" for FLUX, "height" for SD3 / SDXL
    assert _bare(cls)("a", "b", 64)[0][third] == 64


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_wrong_arguments_fail_as_python_says(cls):
    pipe = _bare(cls)
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.__call__\(\) got an unexpected keyword argument 'x'; "):
        pipe("a cat", x=1)
    # issue 31: also an InputError (errors.ArgumentError), naming the closest valid keyword
    with pytest.raises(errors.InputError, match=r"argument 'promt'; did you mean 'prompt'\?$"):
        pipe(promt="a cat")
    with pytest.raises(TypeError, match=rf"^{cls.__name__}\.__call__\(\) got multiple values for argument 'prompt'$"):
        pipe("a cat", prompt="a dog")
    n = len(EXPECTED[cls]) + 1  # with self
    with pytest.raises(TypeError, match=rf"\(\) takes from 1 to {n} positional arguments but {n + 1} were given$"):
        pipe(*range(n))


@pytest.mark.parametrize("cls", FAMILIES, ids=lambda c: c.__name__)
def test_help_shows_every_argument_and_the_family_docstring(cls):
    text = inspect.getdoc(cls.__call__)
    assert text.startswith("Generate images")
    shown = str(inspect.signature(cls.__call__))
    assert all(name in shown for name, _, _ in EXPECTED[cls])
