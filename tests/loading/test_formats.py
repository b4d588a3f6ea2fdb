"""The same weights in every supported layout load to identical tensors and outputs."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow.errors import AmbiguousVariantError, VariantMismatchError
from fastflow.models.flux import make_img_ids


def _forward(model):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    img, txt = (
        torch.randn(2, 6, cfg.in_channels, generator=g),
        torch.randn(2, 4, cfg.context_in_dim, generator=g),
    )
    y = torch.randn(2, cfg.vec_in_dim, generator=g)
    guidance = torch.tensor([3.5, 1.0]) if cfg.guidance_embed else None
    with torch.no_grad():
        return model(img, txt, y, torch.tensor([0.5, 0.9]), make_img_ids(2, 3), guidance=guidance)


def _assert_same(model, state, reference_out):
    got = model.state_dict()
    assert got.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    torch.testing.assert_close(_forward(model), reference_out, rtol=0, atol=0)


def test_bfl_comfyui_and_sharded_diffusers_load_identically(tmp_path, sharded_dev, bfl_state):
    from_diffusers = fastflow.load_transformer(sharded_dev, variant="flux-tiny-dev", dtype=torch.float32)
    out = _forward(from_diffusers)

    bfl = tmp_path / "bfl.safetensors"
    save_file(bfl_state, str(bfl))
    comfy = tmp_path / "comfy.safetensors"
    extras = {  # other components of an all-in-one file are left for their loaders
        "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),
        "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
    }
    save_file({**{f"model.diffusion_model.{k}": v for k, v in bfl_state.items()}, **extras}, str(comfy))
    for path in (bfl, comfy):
        _assert_same(fastflow.load_transformer(path, variant="flux-tiny-dev", dtype=torch.float32), bfl_state, out)


def test_loads_in_the_requested_dtype(bfl_file, bfl_state):
    model = fastflow.load_transformer(bfl_file, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.img_in.weight, bfl_state["img_in.weight"].bfloat16())
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_schnell_is_detected_from_its_keys(tmp_path):
    from ..conftest import tiny_diffusers_flux

    folder = tmp_path / "schnell"
    tiny_diffusers_flux("flux-tiny-schnell").save_pretrained(folder)
    model = fastflow.load_transformer(folder, dtype=torch.float32)
    assert model.config.name == "flux-tiny-schnell" and model.guidance_in is None


def test_dev_and_kontext_need_variant(tmp_path, bfl_state):
    path = tmp_path / "no_metadata.safetensors"
    save_file(bfl_state, str(path))
    with pytest.raises(AmbiguousVariantError) as e:
        fastflow.load_transformer(path)
    assert "variant=" in str(e.value) and "flux-tiny-kontext" in str(e.value) and str(path) in str(e.value)
    assert fastflow.load_transformer(path, variant="flux-tiny-kontext").config.kontext


@pytest.mark.parametrize(
    "metadata,expected",
    [
        ({"fastflow.variant": "flux-tiny-kontext"}, "flux-tiny-kontext"),
        ({"modelspec.architecture": "Flux.1-Kontext-dev"}, "flux-tiny-kontext"),
        ({"fastflow.variant": "flux-tiny-dev"}, "flux-tiny-dev"),
    ],
)
def test_metadata_resolves_the_variant(tmp_path, bfl_state, metadata, expected):
    path = tmp_path / "with_metadata.safetensors"
    save_file(bfl_state, str(path), metadata=metadata)
    assert fastflow.load_transformer(path).config.name == expected


@pytest.mark.parametrize(
    "pipeline,expected", [("FluxKontextPipeline", "flux-tiny-kontext"), ("FluxPipeline", "flux-tiny-dev")]
)
def test_pipeline_folder_resolves_the_variant(tmp_path, sharded_dev, pipeline, expected):
    root = tmp_path / "pipe"
    (root / "transformer").mkdir(parents=True)
    for f in sharded_dev.iterdir():
        os.symlink(f, root / "transformer" / f.name)  # symlinks outside are refused...
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(fastflow.errors.UnsafePathError):
        fastflow.load_transformer(root)
    for f in (root / "transformer").iterdir():  # ...so copy the files in
        f.unlink()
        f.write_bytes((sharded_dev / f.name).read_bytes())
    assert fastflow.load_transformer(root).config.name == expected


def test_huggingface_cache_symlinks_into_blobs_are_allowed(tmp_path, bfl_state):
    repo = tmp_path / "models--org--flux"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    blob = repo / "blobs" / "deadbeef"
    save_file(bfl_state, str(blob), metadata={"fastflow.variant": "flux-tiny-dev"})
    os.symlink(blob, snap / "model.safetensors")
    assert fastflow.load_transformer(snap).config.name == "flux-tiny-dev"


def test_wrong_variant_is_refused(bfl_file):
    with pytest.raises(VariantMismatchError, match="flux-tiny-schnell"):
        fastflow.load_transformer(bfl_file, variant="flux-tiny-schnell")


def test_inspect_reads_headers_only(bfl_file, bfl_state):
    info = fastflow.inspect_checkpoint(bfl_file)
    assert (info.family, info.naming, info.variant) == ("flux", "official", "flux-tiny-dev")
    assert info.num_params == sum(v.numel() for v in bfl_state.values())
    assert info.dtypes == {"F32": len(bfl_state)}
    assert "flux-tiny-dev" in info.summary()
