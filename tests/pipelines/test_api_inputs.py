"""Issue 31, the Python API as a newcomer uses it: the CLI's CPU thread rule in pipeline calls,
device / dtype of fastflow.load checked, mistyped keywords and every argument error an InputError,
numpy / 0-d torch scalars accepted, and the FLUX latent output fastflow's own."""

import json
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow import errors
from fastflow.caching import Schedule, resolve_policy
from fastflow.loading import DEFAULT_MODEL

STEPS = 2


# -- the thread rule ----------------------------------------------------------------------------
def test_a_pipeline_call_on_cpu_runs_the_small_model_on_one_thread_and_restores(digits, monkeypatch):
    monkeypatch.delenv("FASTFLOW_NUM_THREADS", raising=False)
    seen = []
    before = torch.get_num_threads()
    digits("a seven", num_inference_steps=STEPS, output_type="latent",
           callback_on_step_end=lambda p, i, t, kw: seen.append(torch.get_num_threads()) or kw)  # fmt: skip
    assert seen == [1] * STEPS and torch.get_num_threads() == before
    monkeypatch.setenv("FASTFLOW_NUM_THREADS", "3")
    seen.clear()
    digits("a seven", num_inference_steps=STEPS, output_type="latent",
           callback_on_step_end=lambda p, i, t, kw: seen.append(torch.get_num_threads()) or kw)  # fmt: skip
    assert seen == [3] * STEPS and torch.get_num_threads() == before
    monkeypatch.setenv("FASTFLOW_NUM_THREADS", "zero")
    with pytest.raises(errors.InputError, match="FASTFLOW_NUM_THREADS must be a thread count"):
        digits("a seven", num_inference_steps=STEPS)
    assert torch.get_num_threads() == before


def test_num_threads_none_leaves_torchs_setting_and_an_int_is_used(digits, monkeypatch):
    monkeypatch.delenv("FASTFLOW_NUM_THREADS", raising=False)
    seen = []
    record = lambda p, i, t, kw: seen.append(torch.get_num_threads()) or kw  # noqa: E731
    before = torch.get_num_threads()
    try:
        digits.num_threads = None
        digits("a seven", num_inference_steps=1, output_type="latent", callback_on_step_end=record)
        digits.num_threads = 2
        digits("a seven", num_inference_steps=1, output_type="latent", callback_on_step_end=record)
    finally:
        digits.num_threads = "auto"
    assert seen == [before, 2] and torch.get_num_threads() == before


def test_overlapping_calls_restore_torchs_setting_when_the_last_ends(digits, monkeypatch):
    monkeypatch.delenv("FASTFLOW_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    errs = []

    def run():
        try:
            digits("a seven", num_inference_steps=STEPS, output_type="latent")
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and torch.get_num_threads() == before


def test_the_cli_imports_the_same_rule():
    from fastflow.cli import common
    from fastflow.pipelines import threads

    assert common.cpu_threads is threads.cpu_threads and common.SMALL_MODEL_PARAMS == threads.SMALL_MODEL_PARAMS


# -- fastflow.load: device and dtype ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "fp32", "torch.float32", torch.float32])
def test_load_takes_dtype_names_as_torch_and_diffusers_users_write_them(dtype):
    pipe = fastflow.load(DEFAULT_MODEL, device=torch.device("cpu"), dtype=dtype)
    assert pipe.transformer.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["fp16", "half", "bfloat16", "bf16", torch.bfloat16])
def test_load_takes_half_dtype_names(dtype):
    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=dtype)
    assert pipe.transformer.dtype in (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int64, 16, "fp64"])
def test_load_refuses_other_dtypes_typed(dtype):
    with pytest.raises(errors.InputError, match=r"dtype=.* is not one fastflow computes in"):
        fastflow.load(DEFAULT_MODEL, device="cpu", dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_load_on_a_machine_without_cuda_is_a_typed_error(device):
    with pytest.raises(errors.InputError, match='CUDA is not available.*use device="cpu"'):
        fastflow.load(DEFAULT_MODEL, device=device)


@pytest.mark.parametrize("device", ["gpu", "", "tpu"])
def test_load_refuses_device_names_typed(device):
    with pytest.raises(errors.InputError, match="fastflow.load: device"):
        fastflow.load(DEFAULT_MODEL, device=device)


# -- unknown keywords ---------------------------------------------------------------------------
def test_a_mistyped_keyword_is_an_input_error_naming_the_closest(digits):
    with pytest.raises(errors.InputError, match=r"'num_inference_step'; did you mean 'num_inference_steps'\?$"):
        digits("a seven", num_inference_step=3)
    with pytest.raises(TypeError):  # still a TypeError, as Python's own
        digits("a seven", guidance=3)
    with pytest.raises(errors.InputError, match=r"got an unexpected keyword argument 'zzz'; it takes prompt, "):
        digits("a seven", zzz=3)


# -- numpy and 0-d torch scalars ----------------------------------------------------------------
def test_numpy_and_0d_torch_scalars_are_taken_as_numbers(digits):
    plain = digits("a seven", seed=3, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                   num_images_per_prompt=1)  # fmt: skip
    numpy = digits("a seven", seed=np.int64(3), num_inference_steps=np.int32(STEPS), height=np.int64(32),
                   width=torch.tensor(32), output_type="latent", num_images_per_prompt=np.array(1))  # fmt: skip
    torch.testing.assert_close(plain.images, numpy.images, rtol=0, atol=0)
    assert numpy.settings["num_inference_steps"] == STEPS and type(numpy.settings["height"]) is int
    seeds = digits("a seven", seed=[np.uint64(3), np.int16(4)], num_images_per_prompt=2,
                   num_inference_steps=STEPS, output_type="latent")  # fmt: skip
    assert seeds.seeds == [3, 4]
    with pytest.warns(UserWarning, match="guidance"):  # the embedded model ignores guidance, as before
        digits("a seven", guidance_scale=np.float32(2.0), num_inference_steps=1, output_type="latent")
    digits("a seven", cache="fbcache", cache_threshold=np.float64(0.1), num_inference_steps=1, output_type="latent")


def test_numpy_bools_and_arrays_are_still_refused(digits):
    with pytest.raises(errors.InputError, match="num_inference_steps"):
        digits("a seven", num_inference_steps=np.bool_(True))
    with pytest.raises(errors.InputError, match="seed"):
        digits("a seven", seed=np.array([1, 2]))


@pytest.mark.parametrize(
    "kw",
    [
        {"return_dict": None},
        {"return_dict": 1},
        {"output_type": np.array([1, 2])},
        {"sampler": torch.zeros(2, 2)},
        {"sampler": 3},
    ],
)
def test_flags_and_names_of_another_type_are_argument_errors(digits, kw):
    """Found by tools/fuzz.py: these failed deep inside (tuple returned, ambiguous truth values)."""
    (name,) = kw
    with pytest.raises(errors.ArgumentError, match=name):
        digits("a seven", num_inference_steps=1, **kw)


def test_img2img_takes_numpy_strength(load):
    from PIL import Image

    pipe = load("flux-tiny-schnell")
    image = Image.new("RGB", (32, 32), (120, 40, 200))
    a = pipe("a seven", image=image, strength=0.5, seed=1, num_inference_steps=2, output_type="latent").images
    b = pipe("a seven", image=image, strength=np.float32(0.5), seed=1, num_inference_steps=2,
             output_type="latent").images  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- argument errors typed ----------------------------------------------------------------------
def test_mismatched_prompt_embeds_and_pooled_are_input_errors(digits):
    embeds, pooled = digits.text_encoder(["a seven", "a two"])
    with pytest.raises(errors.InputError, match="batch size 2 but pooled_prompt_embeds has 1"):
        digits(prompt_embeds=embeds, pooled_prompt_embeds=pooled[:1], num_inference_steps=1)
    with pytest.raises(errors.InputError, match="pooled_prompt_embeds must be a non-empty floating tensor with 2"):
        digits(prompt_embeds=embeds, pooled_prompt_embeds=pooled[0], num_inference_steps=1)
    with pytest.raises(errors.InputError, match="prompt_embeds must be a non-empty floating tensor with 3"):
        digits(prompt_embeds=embeds.long(), pooled_prompt_embeds=pooled, num_inference_steps=1)


def test_img2img_with_a_generator_list_of_the_wrong_length(load):
    from PIL import Image

    pipe = load("flux-tiny-schnell")
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(errors.InputError, match="got 3 generators for 2 images"):
        pipe("a seven", image=Image.new("RGB", (32, 32)), strength=0.5, generator=gens, num_images_per_prompt=2,
             num_inference_steps=2)  # fmt: skip


@pytest.mark.parametrize("layers", ["7", [1.5], ["1"], 7, [True]])
def test_skip_guidance_layers_must_be_ints(load, layers):
    pipe = load("sd3.5-tiny-medium")
    with pytest.raises(errors.InputError, match="skip_guidance_layers must be a list of block indices"):
        pipe("a seven", skip_guidance_layers=layers, num_inference_steps=1, height=32, width=32)


def test_skip_guidance_layers_take_numpy_ints(load):
    pipe = load("sd3.5-tiny-medium")
    kw = {"num_inference_steps": 2, "height": 32, "width": 32, "seed": 0, "output_type": "latent"}
    a = pipe("a seven", skip_guidance_layers=[0], **kw).images
    b = pipe("a seven", skip_guidance_layers=(np.int64(0),), **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "data",
    [
        [1, 2],
        {"kind": "fastflow-cache-schedule", "mask": [1, 0]},
        {"kind": "fastflow-cache-schedule", "mask": [["1", "0"]]},
        {"kind": "fastflow-cache-schedule", "mask": [[1, 2]]},
        {"kind": "fastflow-cache-schedule", "mask": [[1, 1]], "groups": [[0]]},
        {"kind": "fastflow-cache-schedule", "mask": [[1, 1]], "groups": 5},
        {"kind": "fastflow-cache-schedule", "mask": [[1, 1]], "groups": [[0, "a"], [1, 2]]},
        {"kind": "fastflow-cache-schedule", "mask": [[1, 1]], "groups": [[2, 1], [1, 3]]},
    ],
)
def test_a_malformed_cache_schedule_file_is_an_input_error(tmp_path, data):
    from fastflow.caching.policies import SCHEDULE_KIND

    if isinstance(data, dict):
        data = {**data, "kind": SCHEDULE_KIND}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    with pytest.raises(errors.FastflowError, match="s.json"):
        resolve_policy(str(path))


def test_a_schedule_written_by_fastflow_still_loads(tmp_path):
    path = tmp_path / "s.json"
    Schedule([[1, 1], [0, 1]], groups=[[0, 1], [1, 2]]).save(path)
    assert resolve_policy(str(path)).mask == [[True, True], [False, True]]


def _lora(pipe, tmp_path, name):
    layer = pipe.transformer.get_submodule("img_in")
    state = {
        "transformer.x_embedder.lora_A.weight": torch.zeros(2, layer.in_features),
        "transformer.x_embedder.lora_B.weight": torch.zeros(layer.out_features, 2),
    }
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return pipe.load_lora(path, scale=np.float32(0.5))


def test_lora_methods_with_unknown_names_are_input_errors(tmp_path):
    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    assert _lora(pipe, tmp_path, "style") == "style" and pipe.loras["style"]["scale"] == 0.5
    for call in (lambda: pipe.fuse_lora(["nope"]), lambda: pipe.fuse_lora("nope"), lambda: pipe.unfuse_lora([1]),
                 lambda: pipe.unload_lora(["nope"]), lambda: pipe.set_lora_scales({"nope": 1.0}),
                 lambda: pipe.set_lora_scales([("style", 1.0)]), lambda: pipe.fuse_lora(5)):  # fmt: skip
        with pytest.raises(errors.InputError, match="LoRA"):
            call()
    pipe.set_lora_scales(style=np.float64(0.25))
    assert pipe.loras["style"]["scale"] == 0.25
    pipe.fuse_lora("style")
    assert pipe.loras["style"]["fused"]
    pipe.unfuse_lora()
    pipe.unload_lora("style")
    assert pipe.loras == {}


# -- output_type="latent" -----------------------------------------------------------------------
def test_latent_output_is_the_vae_latent_for_every_family(digits, load):
    """fastflow's own, documented in the README: [B, C, h, w] (the VAE latent, scaled) for every
    family, what ``latents=`` and image-to-image take; diffusers' FluxPipeline returns its packed
    [B, h/2 * w/2, 4C] tokens instead (diffusers' _unpack_latents turns them into this)."""
    out = digits("a seven", num_inference_steps=1, height=32, width=48, output_type="latent").images
    f = digits.vae.downscale
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[2:] == (32 // f, 48 // f)
    again = digits("a seven", num_inference_steps=1, height=32, width=48, latents=out, output_type="latent").images
    assert again.shape == out.shape
    for variant in ("sd3.5-tiny-medium", "sdxl-tiny"):
        pipe = load(variant)
        lat = pipe("a seven", num_inference_steps=1, height=32, width=16, output_type="latent").images
        f = pipe.vae.downscale
        assert lat.ndim == 4 and lat.shape[0] == 1 and lat.shape[2:] == (32 // f, 16 // f)


# -- cache defaults, as the README documents them -----------------------------------------------
def test_the_readme_cache_examples_save_work_on_the_embedded_model(digits):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    example = re.search(r"cache=fastflow\.caching\.(DBCache\([^)]*\))", readme).group(1)
    policy = eval(example, {"DBCache": fastflow.caching.DBCache})
    out = digits("a fox", seed=0, num_inference_steps=28, output_type="latent", cache=policy)
    assert out.stats["work_saved"] > 0.1, example
    documented = re.search(r"there `cache_threshold=([\d.]+)` saves (\d+)%\s+\(fbcache\)", readme)
    out = digits(["a handwritten seven", "number two", "a three", "digit 8"], seed=0, num_inference_steps=28,
                 output_type="latent", cache="fbcache", cache_threshold=float(documented.group(1)))  # fmt: skip
    assert round(100 * out.stats["work_saved"]) == int(documented.group(2))


@pytest.mark.parametrize(
    "value", [np.float64(1.0), torch.zeros(2, 2), "latents", [1]], ids=["np", "tensor", "str", "int"]
)
def test_callback_tensor_inputs_that_are_not_a_list_of_names_are_input_errors(value):
    from fastflow.pipelines.template import TemplateMixin

    with pytest.raises(errors.InputError, match="callback_on_step_end_tensor_inputs must be a list of names"):
        TemplateMixin.check_request({}, None, value)
