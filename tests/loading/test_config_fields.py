"""Issue 31: every config field honoured or refused (the table in fastflow/loading/fields.py, walked
against diffusers' own fields), the 8-group UNet and a VAE of another width against diffusers, sgm
engine buffers skipped, an unnamed SDXL file loaded as base."""

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import fastflow
from fastflow.errors import CheckpointError
from fastflow.loading import described, fields, load_vae
from fastflow.models import configs

from ..conftest import diffusers_unet_config


def _init_fields(cls) -> set[str]:
    return {n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs", "args")}


def test_every_diffusers_field_is_in_the_table():
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, T5Config

    for kind, classes in {
        "sdxl": [UNet2DConditionModel],
        "vae": [AutoencoderKL],
        "flux": [FluxTransformer2DModel],
        "sd3": [SD3Transformer2DModel],
        "sdxl_scheduler": [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler],
        "flow_scheduler": [FlowMatchEulerDiscreteScheduler],
        "clip": [CLIPTextConfig],
        "t5": [T5Config],
    }.items():
        table = fields.TABLES[kind]
        for cls in classes:
            missing = _init_fields(cls) - set(table)
            assert not missing, f"{cls.__name__} fields neither honoured, refused nor irrelevant: {sorted(missing)}"
        for field, (rule, _) in table.items():
            assert rule in ("honoured", "refused", "irrelevant"), (kind, field)


def test_diffusers_defaults_and_real_sdxl_scheduler_pass():
    sdxl_base = {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    }
    fields.check("sdxl_scheduler", sdxl_base, "x")


def _unet_source(cfg: dict, scheduler: dict):
    return SimpleNamespace(
        folder_config={
            "_class_name": "UNet2DConditionModel",
            **diffusers_unet_config(configs.from_name("sdxl-tiny")),
            **cfg,
        },
        scheduler_config=scheduler,
        pipeline_class="StableDiffusionXLPipeline",
        path="/m/unet",
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("prediction_type", "v_prediction"),
        ("prediction_type", "sample"),
        ("beta_start", 0.0001),
        ("beta_end", 0.02),
        ("beta_schedule", "linear"),
        ("steps_offset", 0),
        ("num_train_timesteps", 500),
        ("rescale_betas_zero_snr", True),
    ],
)
def test_sdxl_scheduler_fields_that_change_the_math_are_refused(field, value):
    cfg = configs.from_name("sdxl-tiny")
    with pytest.raises(CheckpointError, match=f"scheduler_config.json {field} is {value!r}"):
        described.unet_refined(cfg, _unet_source({}, {field: value}))


def test_sdxl_scheduler_spacing_is_honoured():
    cfg = configs.from_name("sdxl-tiny")
    assert described.unet_refined(cfg, _unet_source({}, {"timestep_spacing": "linspace"})).spacing == "linspace"
    with pytest.raises(CheckpointError, match="timestep_spacing is 'odd'"):
        described.unet_refined(cfg, _unet_source({}, {"timestep_spacing": "odd"}))


def test_unet_config_fields_that_change_the_math_are_refused():
    cfg = configs.from_name("sdxl-tiny")
    for field, value in [("norm_eps", 1e-6), ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 1)]:
        with pytest.raises(CheckpointError, match=f"config.json {field} is {value!r}"):
            described.unet_refined(cfg, _unet_source({field: value}, {}))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_unet_with_8_groups_matches_diffusers(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = configs.from_name("sdxl-tiny")
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**{**diffusers_unet_config(cfg), "norm_num_groups": 8}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.1 * torch.randn_like(p) + 0.5 * p)
    ref.save_pretrained(tmp_path / "unet")
    model = fastflow.load_transformer(tmp_path / "unet", variant="sdxl-tiny", dtype=torch.float32)
    assert model.config.norm_groups == 8
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, cfg.in_channels, 16, 16, generator=g), torch.tensor([999.0, 300.0])
    ctx, pooled = torch.randn(2, 5, cfg.context_dim, generator=g), torch.randn(2, cfg.pooled_dim, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        ours = model(x, t, ctx, pooled, ids)
        theirs = copy.deepcopy(ref)(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert _rel(ours, theirs) <= 1e-5


@pytest.mark.parametrize(
    "field,value",
    [("cross_attention_dim", 65), ("in_channels", 8), ("layers_per_block", 3)],
)
def test_unet_config_json_that_contradicts_the_tensors_is_refused(tmp_path, field, value):
    """Fields the weights decide are read from the tensors; a config.json that says otherwise does
    not belong to them and is refused, not silently overridden (the fuzzer found them ignored)."""
    import json

    from diffusers import UNet2DConditionModel

    UNet2DConditionModel(**diffusers_unet_config(configs.from_name("sdxl-tiny"))).save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    config[field] = value
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json (describes another architecture|cannot be read)"):
        fastflow.load_transformer(tmp_path / "unet", variant="sdxl-tiny", dtype=torch.float32)


@pytest.mark.parametrize("field,value", [("latent_channels", 5), ("layers_per_block", 3), ("out_channels", 2)])
def test_vae_config_json_that_contradicts_the_tensors_is_refused(tmp_path, field, value):
    import json

    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config[field] = value
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json describes"):
        load_vae(tmp_path / "vae", dtype=torch.float32)


def _narrow_vae():
    """A FLUX-style AutoencoderKL of another width and depth than any registered VAE (32 x (1,1,1,1),
    one block per level, 8 groups), random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    ref = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=8,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        force_upcast=False,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.1 * torch.randn_like(p) + 0.5 * p)
    return ref


def test_vae_of_another_width_and_depth_loads_from_its_config_and_matches_diffusers(tmp_path):
    ref = _narrow_vae()
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae", dtype=torch.float32)
    assert (ours.config.ch, ours.config.ch_mult, ours.config.num_res_blocks) == (32, (1, 1, 1, 1), 1)
    assert ours.config.norm_groups == 8
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        assert _rel(ours.encode(x), 0.3611 * (mean - 0.1159)) <= 1e-5
        raw = torch.randn(1, 16, 4, 6, generator=g)
        assert _rel(ours.decode(0.3611 * (raw - 0.1159)), ref.decode(raw).sample) <= 1e-5


def test_vae_config_fields_that_change_the_math_are_refused(tmp_path):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    ref.save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="config.json latents_mean is"):
        load_vae(tmp_path / "vae", dtype=torch.float32)


@pytest.mark.parametrize("value", ["squaredcos_cap_v2", 1, 0.0])
def test_a_switch_that_is_not_true_or_false_is_refused(tmp_path, value):
    """bool("squaredcos_cap_v2") is True: a string in a switch read as truthy would pass silently."""
    import json

    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32,), norm_num_groups=8).save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["use_post_quant_conv"] = value
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="use_post_quant_conv is .*not true or false"):
        load_vae(tmp_path / "vae", dtype=torch.float32)


def test_sgm_engine_buffers_are_skipped_and_unnamed_sdxl_file_is_base(tmp_path):
    from ..conftest import tiny_diffusers_unet

    tiny_diffusers_unet("sdxl-tiny", seed=4).save_pretrained(tmp_path / "unet")
    model = fastflow.load_transformer(tmp_path / "unet", variant="sdxl-tiny", dtype=torch.float32)
    state = {"model.diffusion_model." + k: v.contiguous() for k, v in model.state_dict().items()}
    state["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000)
    save_file(state, str(tmp_path / "fine_tune.safetensors"))
    with pytest.warns(UserWarning) as notes:
        loaded = fastflow.load_transformer(tmp_path / "fine_tune.safetensors", dtype=torch.float32)
    text = [str(w.message) for w in notes]
    assert any("denoiser.sigmas" in t for t in text) and any("variant='sdxl-turbo'" in t for t in text)
    assert loaded.config.name == "sdxl-tiny" and not loaded.config.turbo
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def _flow_source(scheduler: dict):
    return SimpleNamespace(scheduler_config=scheduler, path="/m/transformer")


def test_flow_scheduler_fields_honoured_or_refused():
    flux = [configs.from_name(n) for n in configs.list_models("flux", include_tiny=True)]
    dev = next(c for c in flux if c.shift_schedule)
    schnell = next(c for c in flux if not c.shift_schedule)
    assert described.flow_refined(dev, _flow_source({"shift": 3.0, "use_dynamic_shifting": True})) == dev
    assert described.flow_refined(schnell, _flow_source({"shift": 1.0, "use_dynamic_shifting": False})) == schnell
    assert described.flow_refined(schnell, _flow_source({"use_dynamic_shifting": True})).shift_schedule
    with pytest.raises(CheckpointError, match="shift 3.0 / use_dynamic_shifting False"):
        described.flow_refined(dev, _flow_source({"shift": 3.0, "use_dynamic_shifting": False}))
    with pytest.raises(CheckpointError, match="scheduler_config.json max_shift is 2.0"):
        described.flow_refined(dev, _flow_source({"max_shift": 2.0, "use_dynamic_shifting": True}))
    mmdit = configs.from_name(configs.list_models("sd3", include_tiny=True)[0])
    assert described.flow_refined(mmdit, _flow_source({"shift": 6.0})).shift == 6.0
    with pytest.raises(CheckpointError, match="use_dynamic_shifting True"):
        described.flow_refined(mmdit, _flow_source({"shift": 3.0, "use_dynamic_shifting": True}))


def test_text_encoder_config_fields_refused():
    from fastflow.loading.text import text_config

    with pytest.raises(CheckpointError, match="config.json is_decoder is True"):
        text_config({"is_decoder": True, "d_model": 64}, "t5", "/m/config.json")


def test_flux_pipeline_folder_with_a_narrow_vae_loads(tmp_path):
    import shutil

    from ..conftest import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "flux", "flux-tiny-dev")
    shutil.rmtree(folder / "vae")
    _narrow_vae().save_pretrained(folder / "vae")
    pipe = fastflow.load(folder, dtype=torch.float32)
    assert (pipe.vae.config.ch, pipe.vae.config.ch_mult, pipe.vae.config.norm_groups) == (32, (1, 1, 1, 1), 8)


def test_sdxl_pipeline_folder_with_v_prediction_is_refused(tmp_path):
    import json

    from ..conftest import tiny_pipeline_folder

    folder = tiny_pipeline_folder(tmp_path / "sdxl", "sdxl-tiny")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match="prediction_type is 'v_prediction'"):
        fastflow.load(folder, dtype=torch.float32)


_NULL_CASES = [
    (kind, field)
    for kind in fields.NULLABLE
    for field, (rule, _) in fields.TABLES[kind].items()
    if rule == "honoured" and not field.startswith("_") and field not in fields.NULLABLE[kind]
]


@pytest.mark.parametrize("kind,field", _NULL_CASES)
def test_a_null_honoured_field_is_refused_not_defaulted(kind, field):
    """diffusers builds its model with the null (and crashes); fastflow used to read null as the
    default (the fuzzer: vae in_channels null loaded as 3)."""
    with pytest.raises(CheckpointError, match=f"config.json {field} is null"):
        fields.check(kind, {field: None}, "x")


def test_nullable_fields_have_a_null_default_or_are_switches_in_diffusers():
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    classes = {"sdxl": UNet2DConditionModel, "vae": AutoencoderKL, "flux": FluxTransformer2DModel,
               "sd3": SD3Transformer2DModel}  # fmt: skip
    for kind, names in fields.NULLABLE.items():
        params = inspect.signature(classes[kind].__init__).parameters
        for name in names:
            assert params[name].default is None or isinstance(params[name].default, bool), (kind, name)
            fields.check(kind, {name: None}, "x")


@pytest.mark.parametrize(
    "up",
    [
        [1e-12, "CrossAttnUpBlock2D", "UpBlock2D"],
        ["trailing", "CrossAttnUpBlock2D", "UpBlock2D"],
        ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
        ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    ],
)
def test_unet_up_blocks_that_do_not_mirror_the_down_blocks_are_refused(up):
    cfg = configs.from_name("sdxl-tiny")
    source = _unet_source({}, {})
    mirror = source.folder_config["up_block_types"]
    assert described.unet_refined(cfg, source) == cfg  # the mirror loads
    assert list(mirror) != up
    with pytest.raises(fastflow.errors.FastflowError, match="up_block_types"):
        described.unet_refined(cfg, _unet_source({"up_block_types": up}, {}))
    with pytest.raises(fastflow.errors.FastflowError, match="down_block_types"):
        described.unet_refined(cfg, _unet_source({"down_block_types": ["DownBlock3D", "DownBlock2D"]}, {}))


@pytest.mark.parametrize(
    "kind,field,value",
    [
        ("vae", "layers_per_block", True),
        ("sdxl", "block_out_channels", [32, True]),
        ("flux", "num_layers", False),
        ("sdxl", "attention_head_dim", ["leading", 4]),
        ("sd3", "num_attention_heads", "18"),
    ],
)
def test_a_value_that_is_not_a_number_is_refused(kind, field, value):
    """True == 1 in Python, so ``layers_per_block: true`` loaded as one block; a junk head count on a
    level without attention was never read (the fuzzer found both)."""
    with pytest.raises(CheckpointError, match=f"config.json {field} is .*not a number"):
        fields.check(kind, {field: value}, "x")
