"""What fastflow does with every field of a diffusers ``config.json`` / ``scheduler_config.json``, per
component kind, in one table: a field that changes the computation is honoured (read into the
config) or refused unless it has the value fastflow computes with; the rest are irrelevant (names,
versions, what the tensors show and the loader checks against them). :func:`check` applies the
"refused" rows; tests/loading/test_config_fields.py walks diffusers' / transformers' own fields so a
new one cannot be ignored silently.

A row is ``("honoured", how)``, ``("irrelevant", why)`` or ``("refused", allowed values)`` (a tuple
of the values accepted; floats compare to 1e-9 relative).
"""

from __future__ import annotations

import math

from ..errors import CheckpointError

_NAME = ("irrelevant", "a name or version, not math")
_SHAPE = ("honoured", "read from the tensors; config.json checked against them")
_NO_MATH = ("irrelevant", "training-only or a default size, no effect at inference")

UNET = {
    "_class_name": ("honoured", "selects the reader (UNet2DConditionModel)"),
    "_diffusers_version": _NAME,
    "_name_or_path": ("honoured", "names the variant (turbo)"),
    "sample_size": ("irrelevant", "the default image size; fastflow's comes from the variant"),
    "in_channels": _SHAPE,
    "out_channels": _SHAPE,
    "block_out_channels": _SHAPE,
    "layers_per_block": _SHAPE,
    "transformer_layers_per_block": _SHAPE,
    "cross_attention_dim": _SHAPE,
    "projection_class_embeddings_input_dim": _SHAPE,
    "down_block_types": _SHAPE,
    "up_block_types": _SHAPE,
    "attention_head_dim": ("honoured", "head width (heads, in diffusers' old naming)"),
    "num_attention_heads": ("honoured", "head width"),
    "addition_time_embed_dim": ("honoured", "time-id width"),
    "norm_num_groups": ("honoured", "UNetConfig.norm_groups: every GroupNorm's groups"),
    "addition_embed_type": ("refused", ("text_time",)),
    "center_input_sample": ("refused", (False,)),
    "flip_sin_to_cos": ("refused", (True,)),
    "freq_shift": ("refused", (0,)),
    "mid_block_type": ("refused", ("UNetMidBlock2DCrossAttn",)),
    "only_cross_attention": ("refused", (False,)),
    "downsample_padding": ("refused", (1,)),
    "mid_block_scale_factor": ("refused", (1,)),
    "dropout": ("irrelevant", "dropout is off at inference"),
    "act_fn": ("refused", ("silu",)),
    "norm_eps": ("refused", (1e-5,)),
    "reverse_transformer_layers_per_block": ("refused", (None,)),
    "encoder_hid_dim": ("refused", (None,)),
    "encoder_hid_dim_type": ("refused", (None,)),
    "dual_cross_attention": ("refused", (False,)),
    "use_linear_projection": ("refused", (True,)),
    "class_embed_type": ("refused", (None,)),
    "num_class_embeds": ("refused", (None,)),
    "upcast_attention": ("irrelevant", "precision only: fastflow attention accumulates in fp32"),
    "resnet_time_scale_shift": ("refused", ("default",)),
    "resnet_skip_time_act": ("refused", (False,)),
    "resnet_out_scale_factor": ("refused", (1.0,)),
    "time_embedding_type": ("refused", ("positional",)),
    "time_embedding_dim": ("refused", (None,)),
    "time_embedding_act_fn": ("refused", (None,)),
    "timestep_post_act": ("refused", (None,)),
    "time_cond_proj_dim": ("refused", (None,)),
    "conv_in_kernel": ("refused", (3,)),
    "conv_out_kernel": ("refused", (3,)),
    "attention_type": ("refused", ("default",)),
    "class_embeddings_concat": ("refused", (False,)),
    "mid_block_only_cross_attention": ("refused", (None, False)),
    "cross_attention_norm": ("refused", (None,)),
    "addition_embed_type_num_heads": ("irrelevant", "used only by the text_image embedding (refused above)"),
}

VAE = {
    "_class_name": ("honoured", "selects the reader (AutoencoderKL)"),
    "_diffusers_version": _NAME,
    "_name_or_path": _NAME,
    "in_channels": _SHAPE,
    "out_channels": _SHAPE,
    "block_out_channels": _SHAPE,
    "layers_per_block": _SHAPE,
    "latent_channels": _SHAPE,
    "use_quant_conv": _SHAPE,
    "use_post_quant_conv": _SHAPE,
    "down_block_types": ("refused", None),  # every entry DownEncoderBlock2D (checked in check())
    "up_block_types": ("refused", None),  # every entry UpDecoderBlock2D
    "norm_num_groups": ("honoured", "VAEConfig.norm_groups"),
    "scaling_factor": ("honoured", "VAEConfig.scale_factor"),
    "shift_factor": ("honoured", "VAEConfig.shift_factor (None: 0)"),
    "force_upcast": ("honoured", "VAEConfig.force_upcast"),
    "act_fn": ("refused", ("silu",)),
    "sample_size": ("irrelevant", "the tile size of diffusers' tiled decode; fastflow tiles by its own size"),
    "latents_mean": ("refused", (None,)),
    "latents_std": ("refused", (None,)),
    "mid_block_add_attention": ("refused", (True,)),
}

FLUX = {
    "_class_name": ("honoured", "selects the reader (FluxTransformer2DModel)"),
    "_diffusers_version": _NAME,
    "_name_or_path": ("honoured", "names the variant (kontext)"),
    "patch_size": ("refused", (1,)),
    "in_channels": _SHAPE,
    "out_channels": _SHAPE,
    "num_layers": _SHAPE,
    "num_single_layers": _SHAPE,
    "attention_head_dim": ("honoured", "head width (num_heads = width / head_dim)"),
    "num_attention_heads": ("honoured", "heads"),
    "joint_attention_dim": _SHAPE,
    "pooled_projection_dim": _SHAPE,
    "guidance_embeds": ("honoured", "guidance embedding and dev-like sampling"),
    "axes_dims_rope": ("honoured", "FluxConfig.axes_dim"),
}

SD3 = {
    "_class_name": ("honoured", "selects the reader (SD3Transformer2DModel)"),
    "_diffusers_version": _NAME,
    "_name_or_path": _NAME,
    "sample_size": ("irrelevant", "the default image size; fastflow's comes from the variant"),
    "patch_size": _SHAPE,
    "in_channels": _SHAPE,
    "out_channels": _SHAPE,
    "num_layers": _SHAPE,
    "attention_head_dim": ("honoured", "head width"),
    "num_attention_heads": ("honoured", "heads"),
    "joint_attention_dim": _SHAPE,
    "caption_projection_dim": ("refused", None),  # must equal the width (checked by the reader)
    "pooled_projection_dim": _SHAPE,
    "pos_embed_max_size": _SHAPE,
    "dual_attention_layers": _SHAPE,
    "qk_norm": ("refused", (None, "rms_norm")),
}

# SDXL's scheduler_config.json (EulerDiscreteScheduler / EulerAncestralDiscreteScheduler): fastflow
# samples with SDXL's scaled-linear epsilon schedule (samplers/discrete.py).
SDXL_SCHEDULER = {
    "_class_name": ("irrelevant", "the sampler is the caller's choice (sampler=)"),
    "_diffusers_version": _NAME,
    "num_train_timesteps": ("refused", (1000,)),
    "beta_start": ("refused", (0.00085,)),
    "beta_end": ("refused", (0.012,)),
    "beta_schedule": ("refused", ("scaled_linear",)),
    "trained_betas": ("refused", (None,)),
    "prediction_type": ("refused", ("epsilon",)),
    "interpolation_type": ("refused", ("linear",)),
    "use_karras_sigmas": ("refused", (False,)),
    "use_exponential_sigmas": ("refused", (False,)),
    "use_beta_sigmas": ("refused", (False,)),
    "sigma_min": ("refused", (None,)),
    "sigma_max": ("refused", (None,)),
    "timestep_spacing": ("honoured", "UNetConfig.spacing (leading / trailing / linspace; trailing: Turbo)"),
    "timestep_type": ("refused", ("discrete",)),
    "steps_offset": ("refused", (1,)),
    "rescale_betas_zero_snr": ("refused", (False,)),
    "final_sigmas_type": ("refused", ("zero",)),
    "clip_sample": _NO_MATH,
    "sample_max_value": _NO_MATH,
    "set_alpha_to_one": _NO_MATH,
    "skip_prk_steps": _NO_MATH,
}

# FLUX / SD3's scheduler_config.json (FlowMatchEulerDiscreteScheduler).
FLOW_SCHEDULER = {
    "_class_name": ("irrelevant", "the sampler is the caller's choice (sampler=)"),
    "_diffusers_version": _NAME,
    "num_train_timesteps": ("refused", (1000,)),
    "shift": ("honoured", "SD3: MMDiTConfig.shift; FLUX: refused unless 1.0 without dynamic shifting"),
    "use_dynamic_shifting": ("honoured", "FLUX: FluxConfig.shift_schedule; SD3: refused unless False"),
    "base_shift": ("refused", (0.5,)),
    "max_shift": ("refused", (1.15,)),
    "base_image_seq_len": ("refused", (256,)),
    "max_image_seq_len": ("refused", (4096,)),
    "invert_sigmas": ("refused", (False,)),
    "shift_terminal": ("refused", (None,)),
    "use_karras_sigmas": ("refused", (False,)),
    "use_exponential_sigmas": ("refused", (False,)),
    "use_beta_sigmas": ("refused", (False,)),
    "time_shift_type": ("refused", ("exponential",)),
    "stochastic_sampling": ("refused", (False,)),
}

# transformers' CLIPTextConfig / T5Config (text encoders, loading/text.py): the size fields are
# honoured (models/text.py's config), the rest below.
_HF_GENERIC = {
    "transformers_version": _NAME,
    "architectures": _NAME,
    "_name_or_path": _NAME,
    "model_type": _NAME,
    "output_hidden_states": ("irrelevant", "fastflow picks the hidden states each pipeline needs"),
    "return_dict": ("irrelevant", "an API choice of transformers"),
    "dtype": ("irrelevant", "the load dtype is fastflow.load's dtype="),
    "torch_dtype": ("irrelevant", "the load dtype is fastflow.load's dtype="),
    "chunk_size_feed_forward": ("irrelevant", "chunking computes the same feed-forward"),
    "id2label": _NAME,
    "label2id": _NAME,
    "problem_type": _NO_MATH,
    "initializer_range": _NO_MATH,
    "initializer_factor": _NO_MATH,
    "pad_token_id": ("irrelevant", "padding comes from the tokenizer"),
}
_HONOURED = ("honoured", "models/text.py's config (checked against the tensors)")
CLIP = {
    **_HF_GENERIC,
    **{f: _HONOURED for f in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim")},
    **{f: _HONOURED for f in ("num_hidden_layers", "num_attention_heads", "max_position_embeddings")},
    "hidden_act": ("honoured", "refused unless an activation fastflow implements"),
    "layer_norm_eps": ("honoured", "the LayerNorms' eps"),
    "eos_token_id": ("honoured", "where the pooled token is read"),
    "bos_token_id": ("irrelevant", "the tokenizer adds it"),
    "attention_dropout": ("irrelevant", "dropout is off at inference"),
    "is_encoder_decoder": ("refused", (False,)),
}
T5 = {
    **_HF_GENERIC,
    **{f: _HONOURED for f in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")},
    **{f: _HONOURED for f in ("relative_attention_num_buckets", "relative_attention_max_distance")},
    "feed_forward_proj": ("honoured", "gated or not, and the activation (refused unless implemented)"),
    "layer_norm_epsilon": ("honoured", "the RMS norms' eps"),
    "is_encoder_decoder": ("irrelevant", "fastflow loads the encoder only"),
    "num_decoder_layers": ("irrelevant", "fastflow loads the encoder only"),
    "is_decoder": ("refused", (False,)),
    "dropout_rate": ("irrelevant", "dropout is off at inference"),
    "classifier_dropout": ("irrelevant", "dropout is off at inference"),
    "use_cache": ("irrelevant", "a decoder cache; the encoder has none"),
    "eos_token_id": ("irrelevant", "the tokenizer adds it"),
}

# Stable Video Diffusion folders (issue 36; loading/svd.py reads them): the UNet, the temporal-decoder
# VAE, the image encoder (transformers' CLIPVisionConfig), the CLIP image processor and the scheduler.
_SVD_SHAPE = ("honoured", "loading/svd.py's config (checked against the tensors)")
SVD_UNET = {
    "_class_name": ("honoured", "selects the reader (UNetSpatioTemporalConditionModel only)"),
    "_diffusers_version": _NAME,
    "_name_or_path": _NAME,
    "sample_size": ("irrelevant", "the default image size; the pipeline's comes from its arguments"),
    **{f: _SVD_SHAPE for f in ("in_channels", "out_channels", "block_out_channels", "layers_per_block")},
    **{f: _SVD_SHAPE for f in ("cross_attention_dim", "projection_class_embeddings_input_dim")},
    "transformer_layers_per_block": _SVD_SHAPE,
    "down_block_types": ("honoured", "levels with attention; up_block_types must mirror them"),
    "up_block_types": ("honoured", "must mirror down_block_types"),
    "num_attention_heads": ("honoured", "SVDUNetConfig.num_heads (not visible in the tensors)"),
    "addition_time_embed_dim": ("honoured", "SVDUNetConfig.time_id_dim (3 x it = the added embedding's input)"),
    "num_frames": ("honoured", "SVDUNetConfig.num_frames: the pipeline's default frame count"),
}
SVD_VAE = {
    "_class_name": ("honoured", "selects the reader (AutoencoderKLTemporalDecoder only)"),
    "_diffusers_version": _NAME,
    "_name_or_path": _NAME,
    **{f: _SVD_SHAPE for f in ("in_channels", "out_channels", "block_out_channels", "latent_channels")},
    "layers_per_block": ("honoured", "VideoVAEConfig.num_res_blocks; 2 only (sgm's mid block)"),
    "down_block_types": ("honoured", "every entry DownEncoderBlock2D, else refused"),
    "sample_size": ("irrelevant", "a default size, no effect on the math"),
    "scaling_factor": ("honoured", "VideoVAEConfig.scale_factor"),
    "force_upcast": ("honoured", "VideoVAEConfig.force_upcast"),
}
CLIP_VISION = {
    **_HF_GENERIC,
    **{f: _HONOURED for f in ("hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers")},
    **{f: _HONOURED for f in ("num_attention_heads", "num_channels", "image_size", "patch_size")},
    "hidden_act": ("honoured", "refused unless an activation fastflow implements"),
    "layer_norm_eps": ("honoured", "the LayerNorms' eps"),
    "attention_dropout": ("irrelevant", "dropout is off at inference"),
    "output_attentions": ("irrelevant", "an API choice of transformers"),
    "is_encoder_decoder": ("refused", (False,)),
}
# StableVideoDiffusionPipeline calls its CLIPImageProcessor with do_normalize=True and do_resize,
# do_center_crop, do_rescale False (it resizes to 224 itself): only the mean and std count
_PIPELINE_SETS = ("irrelevant", "StableVideoDiffusionPipeline overrides it when it calls the processor")
SVD_IMAGE_PROCESSOR = {
    "image_mean": ("honoured", "SVDComponents.image_mean"),
    "image_std": ("honoured", "SVDComponents.image_std"),
    **{f: _PIPELINE_SETS for f in ("do_normalize", "do_resize", "do_center_crop", "do_rescale")},
    **{f: ("irrelevant", "used only by steps the pipeline turns off") for f in ("size", "crop_size", "resample")},
    "rescale_factor": ("irrelevant", "used only by do_rescale, which the pipeline turns off"),
    "do_convert_rgb": ("irrelevant", "the pipeline hands the processor tensors"),
    **{f: _NAME for f in ("image_processor_type", "feature_extractor_type", "processor_class")},
}
# EulerDiscreteScheduler as SVD configures it; fastflow samples with samplers/edm.py (Karras sigmas
# between sigma_min and sigma_max, v-prediction EDM scalings, continuous timesteps 0.25 ln sigma)
_KARRAS = ("irrelevant", "Karras sigmas between sigma_min and sigma_max replace the beta schedule")
SVD_SCHEDULER = {
    "_class_name": ("refused", ("EulerDiscreteScheduler",)),
    "_diffusers_version": _NAME,
    **{f: _KARRAS for f in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")},
    "steps_offset": _KARRAS,
    "sigma_min": ("honoured", "SVDComponents.scheduler: the Karras schedule's smallest sigma"),
    "sigma_max": ("honoured", "SVDComponents.scheduler: the Karras schedule's largest sigma"),
    "prediction_type": ("refused", ("v_prediction",)),
    "timestep_type": ("refused", ("continuous",)),
    "use_karras_sigmas": ("refused", (True,)),
    "use_exponential_sigmas": ("refused", (False,)),
    "use_beta_sigmas": ("refused", (False,)),
    "interpolation_type": ("refused", ("linear",)),
    "timestep_spacing": ("refused", ("leading",)),  # init_noise_sigma sqrt(sigma_max^2 + 1)
    "rescale_betas_zero_snr": ("refused", (False,)),
    "final_sigmas_type": ("refused", ("zero",)),
}

SPACINGS = ("leading", "trailing", "linspace")  # samplers/discrete.py's

TABLES = {
    "sdxl": UNET,
    "vae": VAE,
    "flux": FLUX,
    "sd3": SD3,
    "sdxl_scheduler": SDXL_SCHEDULER,
    "flow_scheduler": FLOW_SCHEDULER,
    "clip": CLIP,
    "t5": T5,
    "svd_unet": SVD_UNET,
    "svd_vae": SVD_VAE,
    "clip_vision": CLIP_VISION,
    "svd_image_processor": SVD_IMAGE_PROCESSOR,
    "svd_scheduler": SVD_SCHEDULER,
}

_LISTS = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}

# honoured fields that may be null (diffusers' default is None and means something: FLUX's
# out_channels = in_channels, SDXL's num_attention_heads = attention_head_dim, no latent shift);
# any other honoured field that is null would crash diffusers, and is refused, never defaulted
# (diffusers reads a null switch as false: FLUX's guidance_embeds the same, the VAE's force_upcast is
# precision only and fastflow keeps upcasting)
NULLABLE = {
    "sdxl": frozenset({"num_attention_heads"}),
    "vae": frozenset({"shift_factor", "force_upcast"}),
    "flux": frozenset({"out_channels", "guidance_embeds"}),
    "sd3": frozenset(),
}


def _equal(value, allowed) -> bool:
    if isinstance(value, bool) or isinstance(allowed, bool) or value is None or allowed is None:
        return value is allowed or (value == allowed and type(value) is type(allowed))
    if isinstance(value, (int, float)) and isinstance(allowed, (int, float)):
        return math.isclose(value, allowed, rel_tol=1e-9)
    return value == allowed


# switches diffusers types as bool: any other JSON value (a string, a number) is a broken file, not a
# truthy setting (bool("squaredcos_cap_v2") would silently read as True)
BOOLEANS = frozenset({
    "center_input_sample", "clip_sample", "dual_cross_attention", "flip_sin_to_cos", "force_upcast",
    "guidance_embeds", "invert_sigmas", "is_decoder", "is_encoder_decoder", "rescale_betas_zero_snr",
    "set_alpha_to_one", "stochastic_sampling", "upcast_attention", "use_beta_sigmas", "use_cache",
    "use_dynamic_shifting", "use_exponential_sigmas", "use_karras_sigmas", "use_linear_projection",
    "use_post_quant_conv", "use_quant_conv",
})  # fmt: skip


_TEXT = frozenset({"down_block_types", "up_block_types"})  # the honoured fields that hold names


def _number(value) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _values(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check(kind: str, cfg: dict, path, file: str = "config.json") -> None:
    """Raise CheckpointError naming the first field of ``cfg`` (a ``kind`` table's file) whose value
    fastflow cannot compute with; fields absent from the file take diffusers' defaults, which the
    table accepts. Fields the table does not know are not diffusers' and diffusers ignores them."""
    for field in TABLES[kind]:
        if field in BOOLEANS and field in cfg and cfg[field] is not None and not isinstance(cfg[field], bool):
            raise CheckpointError(path, f"{file} {field} is {cfg[field]!r}, not true or false", "fix the file")
    for field, (rule, _) in TABLES[kind].items():
        if rule != "honoured" or field.startswith("_") or kind not in NULLABLE:
            continue
        if field in cfg and cfg[field] is None and field not in NULLABLE[kind]:
            raise CheckpointError(path, f"{file} {field} is null; it needs a value", "fix the file")
        if field in cfg and field not in BOOLEANS | _TEXT and not all(map(_number, _values(cfg[field]))):
            raise CheckpointError(path, f"{file} {field} is {cfg[field]!r}: not a number or list of numbers", "fix it")
    for field, (rule, allowed) in TABLES[kind].items():
        if rule != "refused" or field not in cfg:
            continue
        value = cfg[field]
        if field in _LISTS and kind == "vae":
            ok = isinstance(value, (list, tuple)) and all(v == _LISTS[field] for v in value)
            want = f"only {_LISTS[field]} blocks"
        elif allowed is None:
            continue  # checked by the reader
        else:
            ok = any(_equal(value, a) for a in allowed)
            want = " or ".join(repr(a) for a in allowed)
        if not ok:
            raise CheckpointError(
                path,
                f"{file} {field} is {value!r}; fastflow computes only with {want}",
                "this model needs math fastflow does not implement: use diffusers for it, or fix the file",
            )
