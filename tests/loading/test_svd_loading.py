"""Stable Video Diffusion from local files (fastflow/loading/svd.py): a tiny diffusers folder written by
diffusers' / transformers' own classes loads to modules whose outputs equal theirs; a tiny official
single file (sgm / open_clip names, written here by hand from our modules' state dicts) loads to the
same numbers; the full-size official key / shape lists plan onto our modules; bad input is a typed
error; an SVD folder or file is never taken for SDXL, and SDXL still loads."""

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import fastflow.ops.capability
from fastflow.errors import (
    AmbiguousVariantError,
    CheckpointError,
    FamilyMismatchError,
    InputError,
    MissingKeysError,
    ShapeMismatchError,
    UnexpectedKeysError,
)
from fastflow.loading import fields, inspect_checkpoint, load_transformer, load_vae, svd
from fastflow.loading.describe import detect_layout
from fastflow.loading.svd import OPENAI_CLIP_MEAN, is_svd, load_svd, official_variant

from ..conftest import tiny_pipeline_folder, tiny_svd_folder
from ..models.test_clip_vision import _to_openclip

DATA = Path(__file__).parent.parent / "data"
# the modules' parity bound with diffusers (fp32, relative to the largest value; op order gives 1-2e-6
# here); the weights themselves are compared exactly (test_folder_weights_are_diffusers_weights_exactly)
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_svd_folder(tmp_path_factory.mktemp("svd") / "tiny-svd", seed=5)


@pytest.fixture(scope="module")
def ours(folder):
    return load_svd(folder)


@pytest.fixture(scope="module")
def theirs(folder):
    from diffusers import StableVideoDiffusionPipeline

    return StableVideoDiffusionPipeline.from_pretrained(folder, dtype=torch.float32)


def _unet_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, cfg.in_channels, 8, 12, generator=g)
    context = torch.randn(2, 1, cfg.context_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [4.0, 30.0, 0.1]])
    return x, torch.tensor([1.25, -0.5]), context, ids


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -- the diffusers folder ---------------------------------------------------------------------------


def test_folder_loads_to_diffusers_numbers(ours, theirs):
    assert ours.config.name == "svd-tiny" and ours.config.num_frames == 3
    assert ours.scheduler == svd.SVD_SCHEDULER
    assert ours.image_mean == OPENAI_CLIP_MEAN and ours.image_std == svd.OPENAI_CLIP_STD
    with torch.no_grad():
        x, t, context, ids = _unet_inputs(ours.config)
        want = theirs.unet(x, t, encoder_hidden_states=context, added_time_ids=ids).sample
        got = ours.unet(x, t, context, ids)
        assert _max_rel(got, want) <= TOL
        image = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
        want = theirs.vae.encode(image).latent_dist.mode()
        assert _max_rel(ours.vae.encode(image), want) <= TOL
        z = torch.randn(6, 4, 8, 12, generator=torch.Generator().manual_seed(2))
        assert _max_rel(ours.vae.decode(z, 3), theirs.vae.decode(z, num_frames=3).sample) <= TOL
        pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
        got = ours.image_encoder(pixels).image_embeds
        assert _max_rel(got, theirs.image_encoder(pixels).image_embeds) <= TOL


def test_folder_weights_are_diffusers_weights_exactly(ours, theirs):
    """Through the landed key maps, every tensor is the folder's (the UNet / VAE key maps' own tests
    show the maps; here the loader must use them, and nothing else)."""
    from ..models.test_unet_video import ours_from
    from ..models.test_vae_video import _convert

    reference = ours_from(theirs.unet, ours.config).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in ours.unet.state_dict().items())
    reference = _convert(theirs.vae).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in ours.vae.state_dict().items())
    hf = theirs.image_encoder.state_dict()
    assert all(torch.equal(v, hf[k]) for k, v in ours.image_encoder.state_dict().items())


def test_dtype_and_frames_and_processor_fields(folder, tmp_path):
    copy = tmp_path / "svd"
    shutil.copytree(folder, copy)
    path = copy / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_frames": 25}))
    processor = copy / "feature_extractor" / "preprocessor_config.json"
    processor.write_text(json.dumps({**json.loads(processor.read_text()), "image_mean": [0.5, 0.25, 0.125]}))
    loaded = load_svd(copy, dtype=torch.bfloat16)
    assert loaded.config.num_frames == 25 and loaded.image_mean == (0.5, 0.25, 0.125)
    assert loaded.unet.dtype == loaded.vae.dtype == torch.bfloat16
    assert loaded.image_encoder.visual_projection.weight.dtype == torch.bfloat16
    with pytest.raises(InputError, match="num_frames 25"):
        load_svd(copy, variant="svd")
    shutil.rmtree(copy / "feature_extractor")  # OpenAI CLIP's normalisation
    assert load_svd(copy, variant="svd-xt").image_mean == OPENAI_CLIP_MEAN


# -- the official single file ---------------------------------------------------------------------


def _official_state(components, unused: bool = True) -> dict[str, torch.Tensor]:
    """Our modules' tensors under the official sgm / open_clip names, written by hand; with the groups
    sgm files carry unused (filled with other values: reading them would change the numbers)."""
    state = {"model.diffusion_model." + k: v for k, v in components.unet.state_dict().items()}
    for k, v in components.vae.state_dict().items():
        where = "first_stage_model." if k.startswith("decoder.") else "conditioner.embedders.3.encoder."
        state[where + k] = v
        if unused and k.startswith("encoder."):  # first_stage_model's own encoder: unused by sgm
            state["first_stage_model." + k] = torch.randn_like(v)
    layers = components.image_encoder.config.num_hidden_layers
    for k, v in _to_openclip(components.image_encoder.state_dict(), layers).items():
        state["conditioner.embedders.0.open_clip.model.visual." + k] = v
    if unused:
        text = "conditioner.embedders.0.open_clip.model."
        state |= {text + "token_embedding.weight": torch.randn(10, 8), text + "positional_embedding": torch.randn(4, 8),
                  text + "ln_final.weight": torch.ones(8), text + "ln_final.bias": torch.zeros(8),
                  text + "text_projection": torch.randn(8, 8), text + "logit_scale": torch.tensor(4.6),
                  "conditioner.embedders.3.encoder.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
                  "conditioner.embedders.3.encoder.post_quant_conv.weight": torch.randn(4, 4, 1, 1)}  # fmt: skip
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture(scope="module")
def official(ours, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "svd_tiny_official.safetensors"
    save_file(_official_state(ours), path)
    return path


def test_official_file_loads_to_the_folder_numbers(ours, official):
    loaded = load_svd(official, variant="svd-tiny")
    assert loaded.config == ours.config and loaded.scheduler == ours.scheduler
    for name in ("unet", "vae", "image_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(ours, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    with torch.no_grad():
        args = _unet_inputs(ours.config, seed=4)
        assert torch.equal(loaded.unet(*args), ours.unet(*args))
        image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        assert torch.equal(loaded.vae.encode(image), ours.vae.encode(image))


def test_variant_from_the_file_name(tmp_path):
    for name, want in [("svd.safetensors", "svd"), ("svd_xt.safetensors", "svd-xt"),
                       ("SVD_XT_1_1.safetensors", "svd-xt"), ("svd_image_decoder.safetensors", "svd"),
                       ("stable-video-diffusion-img2vid-xt-1-1.safetensors", "svd-xt"),
                       ("stable-video-diffusion-img2vid.safetensors", "svd")]:  # fmt: skip
        assert official_variant(tmp_path / name, None) == want
    assert official_variant(tmp_path / "svd_xt.safetensors", "svd") == "svd"  # variant= wins
    with pytest.raises(AmbiguousVariantError, match='variant="svd"'):
        official_variant(tmp_path / "model.safetensors", None)
    with pytest.raises(InputError, match="not an SVD variant"):
        official_variant(tmp_path / "svd.safetensors", "sdxl")


def test_ambiguous_or_wrong_variant_of_a_file(official, tmp_path):
    renamed = tmp_path / "video_model.safetensors"
    shutil.copy(official, renamed)
    with pytest.raises(AmbiguousVariantError):
        load_svd(renamed)
    named = tmp_path / "svd_xt.safetensors"  # the name says SVD-XT: full-size configs, not these tensors
    shutil.copy(official, named)
    with pytest.raises((MissingKeysError, ShapeMismatchError), match="variant="):
        load_svd(named)


def _full_size_source() -> SimpleNamespace:
    """A header-only stand-in for svd_xt.safetensors: the official key / shape lists (sgm's classes
    on meta; open_clip's vision tower) plus the unused groups."""
    shapes = {}
    for name in ("svd_unet_official_keys.tsv.gz", "svd_vae_keys.tsv.gz", "svd_openclip_visual_key_shapes.tsv.gz"):
        for row in gzip.decompress((DATA / name).read_bytes()).decode().splitlines():
            key, shape = row.split("\t")
            if not key.startswith("vae/"):
                shapes[key] = tuple(json.loads(shape))
    shapes["conditioner.embedders.0.open_clip.model.logit_scale"] = ()
    shapes["conditioner.embedders.3.encoder.decoder.conv_in.weight"] = (512, 4, 3, 3)
    entries = {k: SimpleNamespace(shape=v, dtype=torch.float32) for k, v in shapes.items()}
    files = {k: SimpleNamespace(entries=entries, path=Path("svd_xt.safetensors")) for k in entries}
    return SimpleNamespace(path=Path("svd_xt.safetensors"), key_file=files, metadata={},
                           entry=entries.__getitem__, file_of=lambda k: Path("svd_xt.safetensors"))  # fmt: skip


def test_full_size_official_lists_plan_onto_our_modules():
    source = _full_size_source()
    unet, vae, encoder = svd.plan_official(source, "svd-xt")
    used = {s.key for plan in (unet, vae, encoder) for segs in plan.keys.values() for s in segs}
    unused = {k for k in source.key_file if k not in used}
    assert len(unet.keys) == 1428 and unet.model.config.num_frames == 25
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in unused} == {"first_stage_model.encoder",
                                                                        "conditioner.embedders"}  # fmt: skip
    assert all(k.startswith(("first_stage_model.encoder.", "conditioner.embedders.0.open_clip.model.logit_scale",
                             "conditioner.embedders.3.encoder.decoder.")) for k in unused)  # fmt: skip
    source.key_file["conditioner.embedders.5.foo.weight"] = source.key_file["first_stage_model.decoder.conv_in.bias"]
    with pytest.raises(UnexpectedKeysError, match="embedders.5.foo"):
        svd.plan_official(source, "svd")


# -- bad input --------------------------------------------------------------------------------------


def test_truncated_file_is_refused(official, tmp_path):
    cut = tmp_path / "svd.safetensors"
    cut.write_bytes(official.read_bytes()[:-1000])
    with pytest.raises(CheckpointError):
        load_svd(cut, variant="svd-tiny")


def test_unknown_or_missing_official_tensors(ours, tmp_path):
    state = _official_state(ours)
    path = tmp_path / "svd.safetensors"
    save_file({**state, "conditioner.embedders.7.extra.weight": torch.ones(2)}, path)
    with pytest.raises(UnexpectedKeysError, match="embedders.7.extra"):
        load_svd(path, variant="svd-tiny")
    save_file({**state, "first_stage_model.decoder.extra.weight": torch.ones(2)}, path)
    with pytest.raises(UnexpectedKeysError, match="decoder.extra"):
        load_svd(path, variant="svd-tiny")
    image_decoder = {k: v for k, v in state.items() if not (k.startswith("first_stage_model.decoder.") and any(
        part in k for part in ("mix_factor", "time_stack", "time_mix_conv")))}  # fmt: skip
    save_file(image_decoder, path)
    with pytest.raises(CheckpointError, match="no temporal layers"):
        load_svd(path, variant="svd-tiny")
    del state["conditioner.embedders.3.encoder.quant_conv.weight"]
    save_file(state, path)
    with pytest.raises(MissingKeysError, match="quant_conv"):
        load_svd(path, variant="svd-tiny")


def _edit(folder, tmp_path, file: str, **changes) -> Path:
    copy = tmp_path / "svd"
    shutil.copytree(folder, copy)
    path = copy / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy


@pytest.mark.parametrize(
    "file,changes,match",
    [
        ("scheduler/scheduler_config.json", {"prediction_type": "epsilon"}, "prediction_type is 'epsilon'"),
        ("scheduler/scheduler_config.json", {"use_karras_sigmas": False}, "use_karras_sigmas"),
        ("scheduler/scheduler_config.json", {"timestep_type": "discrete"}, "timestep_type"),
        ("scheduler/scheduler_config.json", {"sigma_min": 800.0}, "not below"),
        ("scheduler/scheduler_config.json", {"_class_name": "EulerAncestralDiscreteScheduler"}, "_class_name"),
        ("unet/config.json", {"up_block_types": ["UpBlockSpatioTemporal"] * 2}, "mirror"),
        ("unet/config.json", {"addition_time_embed_dim": 16}, "3 x"),
        ("unet/config.json", {"num_frames": 0}, "num_frames"),
        ("vae/config.json", {"scaling_factor": "big"}, "scaling_factor"),
        ("image_encoder/config.json", {"hidden_act": "swish-ish"}, "not implemented"),
        ("feature_extractor/preprocessor_config.json", {"image_std": [0.5, 0, 0.5]}, "image_std"),
        ("image_encoder/config.json", {"projection_dim": 8}, "do not fit together"),
        ("vae/config.json", {"latent_channels": 8}, "do not fit together"),
    ],
)
def test_config_fields_that_change_the_math_are_refused(folder, tmp_path, file, changes, match):
    with pytest.raises(CheckpointError, match=match):
        load_svd(_edit(folder, tmp_path, file, **changes))


def test_num_heads_from_config_json_are_honoured(folder, tmp_path):
    """Heads are not visible in the tensors: config.json's must be used (they change the numbers)."""
    loaded = load_svd(_edit(folder, tmp_path, "unet/config.json", num_attention_heads=[1, 4]))
    assert loaded.config.num_heads == (1, 4) and loaded.config.name == "svd (config.json)"


def test_quant_reaches_the_unet_plan(folder, ours):
    from fastflow.quant import Fp8Linear

    with pytest.raises(InputError, match="quant="):
        load_svd(folder, quant="fp4")
    if fastflow.ops.capability.fp8_runs_natively("cpu") is False:
        pytest.skip("this CPU loads FP8 dequantized")
    fp8 = load_svd(folder, quant="fp8")
    assert any(isinstance(m, Fp8Linear) for m in fp8.unet.modules())
    assert not any(isinstance(m, Fp8Linear) for m in (*fp8.vae.modules(), *fp8.image_encoder.modules()))
    with torch.no_grad():
        args = _unet_inputs(ours.config, seed=6)
        assert 0 < _max_rel(fp8.unet(*args), ours.unet(*args)) < 0.2  # quantized, still the same model


def test_missing_parts(folder, tmp_path):
    copy = tmp_path / "svd"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "image_encoder")
    with pytest.raises(CheckpointError, match="image_encoder/"):
        load_svd(copy)
    with pytest.raises(CheckpointError, match="not a Stable Video Diffusion folder"):
        load_svd(tmp_path)


def test_every_diffusers_field_is_in_the_svd_tables():
    import inspect

    from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    def init(cls):
        return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs", "args")}

    for kind, names in {
        "svd_unet": init(UNetSpatioTemporalConditionModel),
        "svd_vae": init(AutoencoderKLTemporalDecoder),
        "svd_scheduler": init(EulerDiscreteScheduler),
        "clip_vision": set(CLIPVisionConfig().to_dict()),
        "svd_image_processor": set(CLIPImageProcessor().to_dict()),
    }.items():
        assert not names - set(fields.TABLES[kind]), (kind, sorted(names - set(fields.TABLES[kind])))


# -- detection: never SDXL --------------------------------------------------------------------------


def test_svd_is_detected_in_both_namings(folder, official):
    assert is_svd(folder) and is_svd(official)
    from safetensors import safe_open

    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert detect_layout(list(f.keys())).family == "svd"
    with safe_open(folder / "vae" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert detect_layout(list(f.keys()), "vae").family == "svd-vae"
    with safe_open(official, "pt") as f:
        assert detect_layout(list(f.keys())).family == "svd"
    info = inspect_checkpoint(official)
    assert (info.family, info.naming) == ("svd", "official")


def test_svd_is_never_loaded_as_sdxl(folder, official):
    for path in (folder, official):
        with pytest.raises(FamilyMismatchError, match="Stable Video Diffusion"):
            load_transformer(path, dtype=torch.float32)
        with pytest.raises(FamilyMismatchError, match="Stable Video Diffusion"):
            load_transformer(path, dtype=torch.float32, family="sdxl")
    with pytest.raises(FamilyMismatchError, match="temporal-decoder"):
        load_vae(folder, dtype=torch.float32)


def test_sdxl_is_not_svd_and_still_loads(tmp_path):
    folder = tiny_pipeline_folder(tmp_path / "sdxl", "sdxl-tiny")
    assert not is_svd(folder) and not is_svd(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert not is_svd(tmp_path / "nothing-here")
    assert load_transformer(folder, dtype=torch.float32).config.family == "sdxl"
    with pytest.raises(CheckpointError, match="not a Stable Video Diffusion folder"):
        load_svd(folder)
    unet = load_transformer(folder, dtype=torch.float32)
    single = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in unet.state_dict().items()}, single)
    assert not is_svd(single) and load_transformer(single, dtype=torch.float32).config.family == "sdxl"
    with pytest.raises(CheckpointError, match="not a Stable Video Diffusion file"):
        load_svd(single, variant="svd")
