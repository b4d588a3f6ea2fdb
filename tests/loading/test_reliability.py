"""Regressions from the loader fuzzing run (issue 11): valid files are never refused, every field is
type-checked before use, only regular files inside the model folder are read, text encoders pass
the same checks as the transformer, and the VAE decodes with its own config's scale/shift."""

import json
import os
import shutil
import struct
import threading

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow import errors
from fastflow.loading import DEFAULT_MODEL, load_clip, load_t5
from fastflow.loading.safetensors_io import MAX_TENSORS, SafetensorsFile

from .conftest import write_raw


def _raw_header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path, header, data, pad_to=8, text=None):
    body = (text if text is not None else json.dumps(header)).encode()
    body += b" " * (-len(body) % pad_to)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize("residue", [128, 0x80 + 2 * 256])
def test_header_length_starting_with_0x80_is_not_pickle(tmp_path, bfl_file, bfl_state, residue):
    """A header length of 128 mod 256 puts 0x80 (pickle's PROTO opcode) in byte 0."""
    header, data = _raw_header(bfl_file)
    body = json.dumps(header).encode()
    body += b" " * ((residue - len(body)) % 256)
    path = tmp_path / "padded.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    assert path.read_bytes()[0] == 0x80
    model = fastflow.load_transformer(path, dtype=torch.float32)
    assert all(torch.equal(v, bfl_state[k]) for k, v in model.state_dict().items())


def test_real_pickles_are_still_refused(tmp_path):
    import pickle

    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0] * 100}, protocol=4))
    with pytest.raises(errors.PickleRefusedError):
        SafetensorsFile(path)


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "text, exc",
    [
        ('{"w": ' + "[" * 5000 + "]" * 5000 + "}", errors.HeaderError),  # RecursionError before
        ('{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', errors.HeaderError),  # unhashable
        ('{"w": {"dtype": "F32", "shape": [Infinity], "data_offsets": [0, 8]}}', errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1e400]}}', errors.HeaderError),  # OverflowError
        ('{"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 8]}}', errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}', errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99999999999999999999]}}', errors.TensorLayoutError),
        ('{"w": {"dtype": "F32", "shape": [2]}}', errors.HeaderError),
        ('{"__metadata__": {"a": {"b": 1}}, "w": ' + json.dumps(ENTRY) + "}", errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [' + "1," * 20 + '2], "data_offsets": [0, 8]}}', errors.HeaderError),
        ('{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, ' + "9" * 5000 + "]}}", errors.HeaderError),
    ],
)
def test_malformed_header_fields_are_typed(tmp_path, text, exc):
    path = write_raw(tmp_path / "bad.safetensors", {}, bytes(8), header_bytes=text.encode())
    with pytest.raises(exc) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value)


def test_huge_headers_are_refused_quickly(tmp_path):
    """An 85 MB header of 1.4 M empty tensors took 36 s and 1.5 GB: now refused before parsing."""
    import time

    n = MAX_TENSORS + 10
    body = "{" + ",".join(f'"t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    path = write_raw(tmp_path / "many.safetensors", {}, header_bytes=body.encode())
    t0 = time.perf_counter()
    with pytest.raises(errors.TooLargeError, match="more than"):
        SafetensorsFile(path)
    assert time.perf_counter() - t0 < 5  # generous: the check is one bytes.count


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
@pytest.mark.parametrize("via_folder", [False, True])
def test_only_regular_files_are_read(tmp_path, kind, via_folder):
    path = tmp_path / "model.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # used to hang `info` and `generate` forever
    else:
        path.symlink_to("/dev/zero")
    result = {}

    def attempt():
        try:
            fastflow.inspect_checkpoint(tmp_path if via_folder else path)
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the load blocked"
    expected = {
        ("directory", False): errors.CheckpointError,  # a folder without weights
        ("device", True): errors.UnsafePathError,  # the symlink leaves the folder
    }.get((kind, via_folder), errors.NotARegularFileError)
    assert isinstance(result.get("error"), expected), result


def _flux_file_folder(tmp_path, bfl_file):
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(bfl_file, folder / "model.safetensors")
    return folder


def test_hf_cache_blobs_must_be_the_real_sibling(tmp_path, bfl_file):
    """X/snapshots/main/ whose X/blobs is a symlink to / used to read any file on the disk."""
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    shutil.copy(bfl_file, secret / "weights")
    repo = tmp_path / "models--x"
    snapshot = repo / "snapshots" / "main"
    snapshot.mkdir(parents=True)
    (repo / "blobs").symlink_to(secret)
    (snapshot / "model.safetensors").symlink_to(repo / "blobs" / "weights")
    with pytest.raises(errors.UnsafePathError):
        fastflow.load_transformer(snapshot, dtype=torch.float32)
    # a real cache (blobs/ a real folder beside snapshots/) still loads
    (repo / "blobs").unlink()
    (repo / "blobs").mkdir()
    shutil.copy(bfl_file, repo / "blobs" / "weights")
    assert fastflow.load_transformer(snapshot, dtype=torch.float32) is not None


def test_config_json_symlinked_outside_is_refused(tmp_path, bfl_file):
    folder = _flux_file_folder(tmp_path, bfl_file)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    (folder / "config.json").symlink_to(outside)
    with pytest.raises(errors.UnsafePathError, match="config.json"):
        fastflow.load_transformer(folder, dtype=torch.float32)


@pytest.mark.parametrize(
    "weight_map",
    [{"a": ["x.safetensors"]}, {"a": 3}, {"a": None}, {"a": {"b": 1}}, {"a": "x.bin"}],
)
def test_bad_weight_map_values_are_typed(tmp_path, bfl_file, weight_map):
    folder = _flux_file_folder(tmp_path, bfl_file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(errors.HeaderError, match="weight_map"):
        fastflow.load_transformer(folder)


@pytest.mark.parametrize("value", [["Flux"], 3, {"a": 1}])
def test_bad_model_index_values_are_typed(tmp_path, bfl_file, value):
    root = tmp_path / "pipe"
    (root / "transformer").mkdir(parents=True)
    shutil.copy(bfl_file, root / "transformer" / "model.safetensors")
    (root / "model_index.json").write_text(json.dumps({"_class_name": value}))
    with pytest.raises(errors.HeaderError, match="_class_name"):
        fastflow.load_transformer(root)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("img_in.weight", [0, 64]),  # zero dimension: ZeroDivisionError / empty model before
        ("double_blocks.0.img_attn.norm.query_norm.scale", [0]),  # hidden // 0
        ("double_blocks.0.img_attn.norm.query_norm.scale", []),  # IndexError before
        ("img_in.weight", [64]),  # rank 1 where detection reads two sizes
        ("final_layer.adaLN_modulation.1.weight", [3, 7]),  # odd rows where halves are taken
    ],
)
def test_unexpected_ranks_and_zero_sizes_are_typed(tmp_path, bfl_state, key, shape):
    state = dict(bfl_state)
    state[key] = torch.zeros(shape)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    with pytest.raises(errors.CheckpointError):
        fastflow.inspect_checkpoint(path)
        fastflow.load_transformer(path, variant="flux-tiny-dev")


def test_zero_dim_vae_tensor_is_typed(tmp_path):
    from fastflow.models import AutoEncoder, from_name

    state = {k: v.contiguous() for k, v in AutoEncoder(from_name("vae-tiny-flux")).state_dict().items()}
    state["encoder.conv_in.weight"] = torch.zeros(0, 3, 3, 3)
    path = tmp_path / "ae.safetensors"
    save_file(state, str(path))
    with pytest.raises(errors.ShapeMismatchError, match="non-zero"):
        fastflow.load_vae(path)


# -- text encoders -------------------------------------------------------------------------------
@pytest.fixture
def clip_folder(tmp_path):
    folder = tmp_path / "clip"
    shutil.copytree(DEFAULT_MODEL / "text_encoder", folder)
    for f in (DEFAULT_MODEL / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _drop_tensor(folder, name):
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    del state[name]
    save_file(state, str(folder / "model.safetensors"))


def test_text_encoder_weights_equal_transformers_bit_for_bit(clip_folder):
    """The same tensors under the same names as transformers loads (our modules keep its names)."""
    from transformers import CLIPTextModel, T5EncoderModel

    ours = load_clip(clip_folder).model.state_dict()
    theirs = CLIPTextModel.from_pretrained(clip_folder, dtype=torch.float32).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    t5 = DEFAULT_MODEL / "text_encoder_2"
    ours = load_t5(t5, DEFAULT_MODEL / "tokenizer_2", dtype=torch.float32).model.state_dict()
    theirs = T5EncoderModel.from_pretrained(t5, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() - {"encoder.embed_tokens.weight"}  # transformers' tied alias of shared
    assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    ids = torch.tensor([[1, 5, 7, 2]])
    reference = CLIPTextModel.from_pretrained(clip_folder, dtype=torch.float32)
    torch.testing.assert_close(load_clip(clip_folder).model(ids).pooler_output, reference(ids).pooler_output)


def test_missing_clip_tensor_is_an_error_not_random_init(clip_folder):
    _drop_tensor(clip_folder, "encoder.layers.1.mlp.fc2.weight")
    with pytest.raises(errors.MissingKeysError, match="encoder.layers.1.mlp.fc2.weight"):
        load_clip(clip_folder)


def test_text_encoder_shape_and_dtype_are_checked(clip_folder):
    from safetensors.torch import load_file

    state = load_file(str(clip_folder / "model.safetensors"))
    state["final_layer_norm.weight"] = torch.zeros(3)
    save_file(state, str(clip_folder / "model.safetensors"))
    with pytest.raises(errors.ShapeMismatchError, match="final_layer_norm"):
        load_clip(clip_folder)
    state["final_layer_norm.weight"] = torch.zeros(64, dtype=torch.int32)
    save_file(state, str(clip_folder / "model.safetensors"))
    with pytest.raises(errors.UnsupportedDtypeError):
        load_clip(clip_folder)


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("num_hidden_layers", 1e9, errors.TooLargeError),  # grew memory without end before
        ("num_hidden_layers", 10**9, errors.TooLargeError),
        ("hidden_size", 0, errors.TooLargeError),
        ("num_attention_heads", 3, errors.CheckpointError),  # 64 % 3: ZeroDivision / shape errors before
        ("vocab_size", "many", errors.CheckpointError),
        ("hidden_act", "no_such_activation", errors.CheckpointError),
    ],
)
def test_text_config_is_bounded(clip_folder, field, value, exc):
    config = json.loads((clip_folder / "config.json").read_text())
    config[field] = value
    (clip_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(exc):
        load_clip(clip_folder)


def _symlinked_from_outside(folder, name, outside_dir):
    """Move ``folder/name`` out of the folder and leave a symlink to it in its place."""
    outside = outside_dir / name
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(errors.UnsafePathError):
        load_clip(folder)
    (folder / name).unlink()


def test_text_encoder_paths_stay_inside(tmp_path, clip_folder):
    _symlinked_from_outside(clip_folder, "model.safetensors", tmp_path)
    index = {"weight_map": {"final_layer_norm.weight": "../model.safetensors"}}
    (clip_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(errors.UnsafePathError):
        load_clip(clip_folder)


def test_tokenizer_file_outside_or_broken_is_typed(tmp_path, clip_folder):
    _symlinked_from_outside(clip_folder, "tokenizer.json", tmp_path)
    (clip_folder / "tokenizer.json").write_text('{"model": {"vocab": 1e400}}')
    with pytest.raises(errors.CheckpointError, match="tokenizer"):
        load_clip(clip_folder)


def test_truncated_text_weights_are_typed(clip_folder):
    path = clip_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # raw SafetensorError before
    with pytest.raises(errors.TruncatedFileError):
        load_clip(clip_folder)


# -- the VAE's latent scale and shift ------------------------------------------------------------
def test_embedded_vae_decodes_with_its_trained_scale_and_shift():
    config = json.loads((DEFAULT_MODEL / "vae" / "config.json").read_text())
    vae = fastflow.load_vae(DEFAULT_MODEL / "vae", dtype=torch.float32)
    assert (vae.config.scale_factor, vae.config.shift_factor) == (config["scaling_factor"], config["shift_factor"])
    registered = fastflow.models.from_name("fastflow-tiny-digits-vae")
    assert (registered.scale_factor, registered.shift_factor) == (config["scaling_factor"], config["shift_factor"])


def _vae_folder(tmp_path, config):
    from fastflow.models import AutoEncoder, from_name

    folder = tmp_path / "vae"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in AutoEncoder(from_name("vae-tiny-flux")).state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_vae_config_values_override_the_registered_ones(tmp_path):
    vae = fastflow.load_vae(_vae_folder(tmp_path, {"scaling_factor": 0.5, "shift_factor": 0.25}))
    assert (vae.config.scale_factor, vae.config.shift_factor) == (0.5, 0.25)


@pytest.mark.parametrize(
    "config",
    [
        {"scaling_factor": 0},
        {"scaling_factor": float("nan")},
        {"scaling_factor": "x"},
        {"scaling_factor": 1.0, "shift_factor": float("inf")},
    ],
)
def test_bad_vae_scale_is_refused(tmp_path, config):
    with pytest.raises(errors.CheckpointError, match="finite"):
        fastflow.load_vae(_vae_folder(tmp_path, config))


def test_text_encoders_in_older_transformers_layouts_load(clip_folder, tmp_path):
    """Real FLUX / SD3 files were written by older transformers: CLIP keys under ``text_model.``
    with an int64 ``position_ids`` buffer, T5 with both tied embedding names."""
    from safetensors.torch import load_file

    reference = load_clip(clip_folder).model.state_dict()
    state = load_file(str(clip_folder / "model.safetensors"))
    old = {"text_model." + k: v for k, v in state.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(8).unsqueeze(0)
    save_file(old, str(clip_folder / "model.safetensors"))
    loaded = load_clip(clip_folder).model.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)

    t5 = tmp_path / "t5"
    shutil.copytree(DEFAULT_MODEL / "text_encoder_2", t5)
    state = load_file(str(t5 / "model.safetensors"))
    save_file({**state, "encoder.embed_tokens.weight": state["shared.weight"].clone()}, str(t5 / "model.safetensors"))
    model = load_t5(t5, DEFAULT_MODEL / "tokenizer_2", dtype=torch.float32).model
    assert torch.equal(model.shared.weight, state["shared.weight"].float())
    only_alias = {k: v for k, v in state.items() if k != "shared.weight"}  # a writer that kept only the alias
    save_file({**only_alias, "encoder.embed_tokens.weight": state["shared.weight"]}, str(t5 / "model.safetensors"))
    model = load_t5(t5, DEFAULT_MODEL / "tokenizer_2", dtype=torch.float32).model
    assert torch.equal(model.shared.weight, state["shared.weight"].float())
