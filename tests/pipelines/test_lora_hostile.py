"""Hostile and broken LoRA files (issue 31): every one a typed fastflow error naming the key, or a
clean load; never a silent cast of integer / bool tensors, NaN / inf / absurd values, or the same
layer applied twice. A small fuzz over generated bad files checks the same."""

import json
import random
import struct

import pytest
import torch
from safetensors.torch import save_file

from fastflow import errors

RANK = 4
LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear2")


@pytest.fixture(scope="module")
def pipe(pipeline_folders):
    import fastflow

    p = fastflow.load(pipeline_folders["flux-tiny-dev"], dtype=torch.float32, device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def _good(pipe, seed=0, alpha=True):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in LAYERS:
        layer = pipe.transformer.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = torch.randn(RANK, layer.in_features, generator=g) * 0.2
        state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, RANK, generator=g) * 0.2
        if alpha:
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    return state


def _save(tmp_path, name, state, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata=metadata)
    return path


DOWN = "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
UP = "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"
ALPHA = "lora_unet_double_blocks_0_img_attn_qkv.alpha"


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool, torch.int64])
@pytest.mark.parametrize("key", [DOWN, UP])
def test_integer_and_bool_tensors_are_refused_naming_the_dtype(pipe, tmp_path, dtype, key):
    state = _good(pipe)
    state[key] = (state[key] * 10).to(dtype)
    with pytest.raises(errors.LoraError, match=rf"{key}.*{str(dtype).removeprefix('torch.')}"):
        pipe.load_lora(_save(tmp_path, "int", state))
    assert pipe.loras == {}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", [DOWN, UP, ALPHA])
def test_non_finite_values_are_refused_naming_the_tensor(pipe, tmp_path, value, key):
    state = _good(pipe)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    with pytest.raises(errors.LoraError, match=rf"{key}.*NaN or inf"):
        pipe.load_lora(_save(tmp_path, "nan", state))
    assert pipe.loras == {}


@pytest.mark.parametrize("key,value", [(DOWN, 1e30), (UP, -2e4), (ALPHA, 1e30)])
def test_absurd_magnitudes_are_refused(pipe, tmp_path, key, value):
    state = _good(pipe)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    with pytest.raises(errors.LoraError, match=r"double_blocks_0_img_attn_qkv.*beyond"):
        pipe.load_lora(_save(tmp_path, "big", state))


def test_alpha_of_several_values_and_rank_zero_are_typed(pipe, tmp_path):
    state = _good(pipe)
    state[ALPHA] = torch.ones(3)
    with pytest.raises(errors.LoraError, match="not one number"):
        pipe.load_lora(_save(tmp_path, "alpha", state))
    state = _good(pipe)
    state[DOWN], state[UP] = state[DOWN][:0], state[UP][:, :0]
    with pytest.raises(errors.LoraError, match="rank 0"):
        pipe.load_lora(_save(tmp_path, "rank0", state))


def test_an_integer_alpha_is_its_number(pipe, tmp_path):
    state = _good(pipe)
    kw = {"height": 32, "width": 32, "num_inference_steps": 1, "seed": 1, "output_type": "latent"}
    pipe.load_lora(_save(tmp_path, "float", state))
    expected = pipe("a seven", **kw).images
    pipe.unload_lora()
    state = {k: (v.to(torch.int64) if k.endswith(".alpha") else v) for k, v in state.items()}
    pipe.load_lora(_save(tmp_path, "int", state))
    torch.testing.assert_close(pipe("a seven", **kw).images, expected, rtol=0, atol=0)
    pipe.unload_lora()


def test_the_same_layer_under_two_prefixes_is_refused_naming_both(pipe, tmp_path):
    state = _good(pipe, alpha=False)
    peft = {}
    for k, v in state.items():
        module = k.split(".")[0].removeprefix("lora_unet_")
        name = next(n for n in LAYERS if n.replace(".", "_") == module)
        role = "lora_A" if "down" in k else "lora_B"
        peft[f"{name}.{role}.weight"] = v
        peft[f"diffusion_model.{name}.{role}.weight"] = v
    with pytest.raises(errors.LoraError, match=r"diffusion_model\.double_blocks\.0\.img_attn\.qkv.*both target"):
        pipe.load_lora(_save(tmp_path, "twice", peft))
    # diffusers' to_q and the official fused qkv name: the same rows of one layer
    hidden = pipe.transformer.config.hidden_size
    both = dict(state)
    both["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.zeros(RANK, hidden)
    both["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.zeros(hidden, RANK)
    with pytest.raises(errors.LoraError, match=r"lora_unet_double_blocks_0_img_attn_qkv.*to_q.*both target|"
                       r"to_q.*lora_unet_double_blocks_0_img_attn_qkv.*both target"):  # fmt: skip
        pipe.load_lora(_save(tmp_path, "both", both))
    assert pipe.loras == {}


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _mutations(pipe, tmp_path, n):
    """n broken LoRA files: wrong dtypes, non-finite and huge values, bad shapes, duplicated
    targets, missing halves, truncated files, non-string metadata."""
    rng = random.Random(31)
    dtypes = [torch.int8, torch.int16, torch.int32, torch.uint8, torch.bool, torch.float16, torch.bfloat16,
              torch.float64, torch.float8_e4m3fn]  # fmt: skip
    for i in range(n):
        state = _good(pipe, seed=i, alpha=rng.random() < 0.5)
        keys = sorted(state)
        key = rng.choice(keys)
        kind = rng.choice(["dtype", "value", "shape", "dup", "drop", "truncate", "metadata", "extra", "scalar"])
        metadata = None
        if kind == "dtype":
            state[key] = state[key].to(rng.choice(dtypes))
        elif kind == "value":
            state[key] = state[key].clone().float()
            state[key].view(-1)[rng.randrange(state[key].numel())] = rng.choice(
                [float("nan"), float("inf"), 1e30, -1e5]
            )
        elif kind == "shape":
            state[key] = torch.zeros(tuple(rng.choice([0, 1, 3, 7]) for _ in range(rng.randrange(0, 4))))
        elif kind == "dup":
            state["transformer." + key] = state[key]
        elif kind == "drop":
            del state[key]
        elif kind == "extra":
            state[key.replace("lora_unet_", "lora_unet_x")] = state[key]
        elif kind == "scalar":
            state[key] = torch.tensor(rng.choice([0.0, -1.0, 3.0]))
        path = _save(tmp_path, f"fuzz{i}", state, metadata)
        if kind == "truncate":
            path.write_bytes(path.read_bytes()[: rng.randrange(1, path.stat().st_size)])
        elif kind == "metadata":
            _rewrite_header(path, lambda h: {**h, "__metadata__": {"a": rng.choice([1, [1], {"b": "c"}, None])}})
        yield kind, path


def test_fuzzed_lora_files_give_typed_errors_or_clean_loads(pipe, tmp_path):
    outcomes = {}
    for kind, path in _mutations(pipe, tmp_path, 48):
        try:
            name = pipe.load_lora(path)
        except errors.FastflowError:
            outcomes[kind] = outcomes.get(kind, 0) + 1
            assert pipe.loras == {}
            continue
        assert name in pipe.loras
        pipe.unload_lora()
    assert sum(outcomes.values()) > 20, outcomes


@pytest.mark.parametrize("shape", [(), (RANK,), (1, RANK, 4)], ids=["0-d", "1-d", "3-d"])
def test_a_lora_weight_that_is_not_a_matrix_is_refused(pipe, tmp_path, shape):
    state = _good(pipe)
    state[DOWN] = torch.ones(shape)
    with pytest.raises(errors.LoraError, match=rf"{DOWN}.*not a \[rank, features\] matrix"):
        pipe.load_lora(_save(tmp_path, "dims", state))
    assert pipe.loras == {}


@pytest.mark.parametrize("path", [5, None, ["a.safetensors"]])
def test_load_lora_of_something_not_a_path_is_an_input_error(pipe, path):
    with pytest.raises(errors.InputError, match="load_lora takes the path"):
        pipe.load_lora(path)
