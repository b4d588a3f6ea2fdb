"""Every bad checkpoint a user can hand us gets a typed error naming the file and what to do."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow import errors
from fastflow.cli import main as cli_main

from .conftest import write_raw


def _load(path, **kw):
    return fastflow.load_transformer(path, **kw)


def _raises(exc, path, *, match=None, **kw):
    with pytest.raises(exc, match=match) as e:
        _load(path, **kw)
    assert str(path) in str(e.value), "the error must name the file"
    assert isinstance(e.value, errors.CheckpointError)
    return e.value


def test_truncated_file(tmp_path, bfl_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(bfl_file.read_bytes()[:-1000])
    err = _raises(errors.TruncatedFileError, cut)
    assert "again" in err.fix


def test_truncated_inside_the_header(tmp_path, bfl_file):
    cut = tmp_path / "cut_header.safetensors"
    cut.write_bytes(bfl_file.read_bytes()[:100])
    _raises(errors.TruncatedFileError, cut)


def test_header_not_json(tmp_path):
    _raises(errors.HeaderError, write_raw(tmp_path / "x.safetensors", {}, header_bytes=b"{not json"), match="JSON")


def test_header_over_100_mb(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((200 * 1024 * 1024).to_bytes(8, "little") + b"{}")
    _raises(errors.HeaderError, path, match="limit")


def _two(a, b, n=16):
    return {
        "a": {"dtype": "F32", "shape": [n // 4], "data_offsets": a},
        "b": {"dtype": "F32", "shape": [n // 4], "data_offsets": b},
    }


def test_overlapping_offsets(tmp_path):
    _raises(
        errors.TensorLayoutError,
        write_raw(tmp_path / "o.safetensors", _two([0, 16], [8, 24]), bytes(24)),
        match="overlaps",
    )


def test_gap_between_tensors(tmp_path):
    _raises(
        errors.TensorLayoutError,
        write_raw(tmp_path / "g.safetensors", _two([0, 16], [20, 36]), bytes(36)),
        match="gap",
    )


def test_offsets_past_the_end(tmp_path):
    _raises(errors.TruncatedFileError, write_raw(tmp_path / "p.safetensors", _two([0, 16], [16, 32]), bytes(20)))


def test_size_disagrees_with_shape(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}
    _raises(errors.TensorLayoutError, write_raw(tmp_path / "s.safetensors", header, bytes(16)), match="needs 12")


def test_unknown_dtype(tmp_path):
    header = {"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}
    _raises(errors.UnsupportedDtypeError, write_raw(tmp_path / "d.safetensors", header, bytes(16)), match="C64")


def test_integer_weights_are_refused(tmp_path, bfl_state):
    state = dict(bfl_state, **{"img_in.bias": torch.zeros(64, dtype=torch.int32)})
    save_file(state, str(tmp_path / "i.safetensors"))
    with pytest.raises(errors.UnsupportedDtypeError, match="img_in.bias"):
        _load(tmp_path / "i.safetensors", variant="flux-tiny-dev")


def test_shape_mismatch(tmp_path, bfl_state):
    key = "double_blocks.1.img_mlp.2.weight"
    state = dict(bfl_state, **{key: torch.zeros(64, 128)})
    save_file(state, str(tmp_path / "m.safetensors"))
    err = _raises(errors.ShapeMismatchError, tmp_path / "m.safetensors", variant="flux-tiny-dev")
    assert err.mismatches == {key: ((64, 128), (64, 256))}


def test_missing_key_is_never_random_init(tmp_path, bfl_state):
    state = {k: v for k, v in bfl_state.items() if k != "double_blocks.1.txt_mlp.0.bias"}
    save_file(state, str(tmp_path / "missing.safetensors"))
    err = _raises(errors.MissingKeysError, tmp_path / "missing.safetensors", variant="flux-tiny-dev")
    assert err.missing == ["double_blocks.1.txt_mlp.0.bias"]


def test_unexpected_keys_are_listed(tmp_path, bfl_state):
    state = dict(bfl_state, **{"double_blocks.0.lora_up.weight": torch.zeros(2), "mystery": torch.zeros(1)})
    save_file(state, str(tmp_path / "extra.safetensors"))
    err = _raises(errors.UnexpectedKeysError, tmp_path / "extra.safetensors", variant="flux-tiny-dev")
    assert err.unexpected == ["double_blocks.0.lora_up.weight", "mystery"]


def test_unknown_key_beside_a_prefixed_transformer(tmp_path, bfl_state):
    state = {f"model.diffusion_model.{k}": v for k, v in bfl_state.items()}
    state["controlnet.zero_conv.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "comfy_extra.safetensors"))
    err = _raises(errors.UnexpectedKeysError, tmp_path / "comfy_extra.safetensors", variant="flux-tiny-dev")
    assert err.unexpected == ["controlnet.zero_conv.weight"]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_files_are_refused_unread(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    err = _raises(errors.PickleRefusedError, path)
    assert "safetensors" in err.fix


def test_pickle_disguised_as_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, path)
    _raises(errors.PickleRefusedError, path)


def test_folder_with_only_pickle_weights(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.bin")
    _raises(errors.PickleRefusedError, tmp_path)


def test_index_entry_outside_the_folder(tmp_path, bfl_state):
    outside = tmp_path / "outside.safetensors"
    save_file(bfl_state, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    weight_map = {k: "../outside.safetensors" for k in bfl_state}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _raises(errors.UnsafePathError, folder)


def test_index_entry_through_a_symlinked_subfolder(tmp_path, bfl_state):
    (tmp_path / "elsewhere").mkdir()
    save_file(bfl_state, str(tmp_path / "elsewhere" / "shard.safetensors"))
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(tmp_path / "elsewhere", folder / "sub")
    weight_map = {k: "sub/shard.safetensors" for k in bfl_state}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _raises(errors.UnsafePathError, folder)


def test_symlink_leading_outside_the_folder(tmp_path, bfl_file):
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(bfl_file, folder / "diffusion_pytorch_model.safetensors")
    _raises(errors.UnsafePathError, folder)


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 23802932552\n")
    err = _raises(errors.LfsPointerError, path)
    assert "git lfs pull" in err.fix


def test_sd3_checkpoint_passed_as_flux(tmp_path):
    state = {
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(12, 4),
        "model.diffusion_model.pos_embed": torch.zeros(1, 4, 4),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),
    }
    save_file(state, str(tmp_path / "sd3.safetensors"))
    err = _raises(errors.FamilyMismatchError, tmp_path / "sd3.safetensors", family="flux")
    assert "SD3" in str(err)


def test_vae_passed_as_transformer(tmp_path):
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, str(tmp_path / "ae.safetensors"))
    err = _raises(errors.FamilyMismatchError, tmp_path / "ae.safetensors")
    assert "VAE" in str(err) and "vae=" in err.fix


def test_unregistered_size_names_what_was_found(tmp_path, bfl_state):
    state = {k: v for k, v in bfl_state.items() if not k.startswith("single_blocks.1.")}
    save_file(state, str(tmp_path / "odd.safetensors"))
    err = _raises(errors.UnknownConfigError, tmp_path / "odd.safetensors")
    assert "depth_single_blocks=1" in str(err) and "config=" in err.fix


def test_missing_path(tmp_path):
    _raises(errors.CheckpointError, tmp_path / "nope.safetensors", match="no such file")


def test_cli_reports_one_line_and_exit_code_2(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x04junk")
    assert cli_main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastflow: error:") and "\n" not in err and str(path) in err
