"""Model configs: frozen dataclasses in one registry, looked up by name (gpt-fast ModelArgs style).

Values for the full-size models are REFERENCE.md section 1. The tiny configs mirror the paired
diffusers/official test models of REFERENCE.md section 5.5 and are used by the tests.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import InputError, UnknownModelError


@dataclass(frozen=True)
class SamplingDefaults:
    """How a model is sampled when the caller does not say: facts of the model that are not visible
    in its weights (REFERENCE.md 4.2-4.3). ``guidance``: the distilled-guidance or CFG scale
    (None: the model takes none); ``true_cfg``: FLUX true-CFG scale for models trained for it;
    ``size``: (height, width) in pixels; ``view_upscale``: the CLI's nearest-neighbour upscale of
    saved PNGs (tiny models)."""

    steps: int
    guidance: float | None
    sampler: str = "euler"
    true_cfg: float | None = None
    size: tuple[int, int] = (1024, 1024)
    view_upscale: int = 1

    def as_dict(self) -> dict:
        """The pipeline's ``defaults`` dict: steps, guidance, sampler (and true_cfg where set)."""
        out = {"steps": self.steps, "guidance": self.guidance, "sampler": self.sampler}
        return out if self.true_cfg is None else {**out, "true_cfg": self.true_cfg}


FLUX_DEV_SAMPLING = SamplingDefaults(steps=28, guidance=3.5)
FLUX_SCHNELL_SAMPLING = SamplingDefaults(steps=4, guidance=None)
FLUX_KONTEXT_SAMPLING = SamplingDefaults(steps=28, guidance=2.5)
# FLUX.1 Fill / Canny / Depth: BFL's and diffusers' examples (50 steps; guidance 30, 30, 10)
FLUX_FILL_SAMPLING = SamplingDefaults(steps=50, guidance=30.0)
FLUX_CANNY_SAMPLING = SamplingDefaults(steps=50, guidance=30.0)
FLUX_DEPTH_SAMPLING = SamplingDefaults(steps=50, guidance=10.0)
SD3_MEDIUM_SAMPLING = SamplingDefaults(steps=28, guidance=7.0)  # diffusers' SD3-medium defaults
SD35_SAMPLING = SamplingDefaults(steps=40, guidance=4.5, sampler="dpmpp_2m")  # SAI's sampler
SD35_TURBO_SAMPLING = SamplingDefaults(steps=4, guidance=0.0)
SDXL_SAMPLING = SamplingDefaults(steps=30, guidance=5.0)  # REFERENCE.md: SDXL base, Euler, leading
SDXL_TURBO_SAMPLING = SamplingDefaults(steps=1, guidance=0.0, sampler="euler_ancestral", size=(512, 512))


class _Config:
    """What every config shares: ``replace`` and, for transformers, head / MLP widths."""

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


class _TransformerConfig(_Config):
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def check_heads(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{self.name}: hidden_size {self.hidden_size} not divisible by num_heads")


@dataclass(frozen=True)
class FluxConfig(_TransformerConfig):
    name: str
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    # Sampling facts that are not visible in the weights (REFERENCE.md section 4.2).
    shift_schedule: bool = True
    t5_max_length: int = 512
    kontext: bool = False
    sampling: SamplingDefaults = FLUX_DEV_SAMPLING

    family = "flux"

    def arch(self) -> tuple:
        """The fields that the weights determine: configs with equal arch() share checkpoints."""
        return (
            self.in_channels,
            self.out_channels,
            self.vec_in_dim,
            self.context_in_dim,
            self.hidden_size,
            self.mlp_hidden,
            self.num_heads,
            self.depth,
            self.depth_single_blocks,
            self.guidance_embed,
        )

    def __post_init__(self):
        self.check_heads()
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"{self.name}: sum(axes_dim)={sum(self.axes_dim)} != head_dim {self.head_dim}")

    @property
    def conditioning(self) -> str | None:
        """What img_in reads beside the noise, from its width: None (in = out), "control" (FLUX.1
        Canny / Depth: + the control image's latents, in = 2 out) or "fill" (FLUX.1 Fill: + the
        masked image's latents and the packed mask, in > 2 out)."""
        if self.in_channels == self.out_channels:
            return None
        return "control" if self.in_channels == 2 * self.out_channels else "fill"


@dataclass(frozen=True)
class MMDiTConfig(_TransformerConfig):
    """SD3 / SD3.5 MMDiT(-X). SAI's rule hidden = 64 * depth, heads = depth holds for every
    official model; the fields are kept independent for tiny test models."""

    name: str
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    mlp_ratio: float = 4.0
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    context_in_dim: int = 4096
    adm_in_dim: int = 2048
    pos_embed_max_size: int = 192
    qk_norm: bool = False  # RMSNorm ln_q / ln_k (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # MMDiT-X attn2 layers (SD3.5-medium)
    qkv_bias: bool = True
    # Sampling facts not visible in the weights (REFERENCE.md section 4.3).
    shift: float = 3.0
    turbo: bool = False
    sampling: SamplingDefaults = SD3_MEDIUM_SAMPLING

    family = "sd3"

    def arch(self) -> tuple:
        return (
            self.depth,
            self.hidden_size,
            self.num_heads,
            self.mlp_hidden,
            self.patch_size,
            self.in_channels,
            self.out_channels,
            self.context_in_dim,
            self.adm_in_dim,
            self.pos_embed_max_size,
            self.qk_norm,
            tuple(self.dual_attention_layers),
        )

    def __post_init__(self):
        self.check_heads()
        if any(not 0 <= i < self.depth for i in self.dual_attention_layers):
            raise ValueError(f"{self.name}: dual_attention_layers must be block indices < depth")


def _check_groups(name: str, groups, widths: list[int]) -> None:
    """GroupNorm groups: a positive int dividing every level's width."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0 or any(w % groups for w in widths):
        raise InputError(f"{name}: norm_num_groups {groups!r} must be a positive number dividing every width {widths}")


@dataclass(frozen=True)
class VAEConfig(_Config):
    """AutoencoderKL (FLUX ae / SD3 VAE share the architecture; scale and shift differ)."""

    name: str
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    quant_conv: bool = False  # 1x1 quant_conv / post_quant_conv around the latent (SDXL's VAE)
    # decode a float16 VAE in float32 (SDXL's VAE overflows in fp16; the "fp16-fix" VAE does not)
    force_upcast: bool = False
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups; not visible in the weights)

    family = "vae"

    def __post_init__(self):
        scale, shift = self.scale_factor, self.shift_factor
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
            raise InputError(f"VAE scale_factor must be a finite non-zero number, got {scale!r}")
        if not (isinstance(shift, (int, float)) and math.isfinite(shift)):
            raise InputError(f"VAE shift_factor must be a finite number, got {shift!r}")
        _check_groups(self.name, self.norm_groups, [self.ch * m for m in self.ch_mult])

    def arch(self) -> tuple:
        return (
            self.ch,
            tuple(self.ch_mult),
            self.num_res_blocks,
            self.z_channels,
            self.in_channels,
            self.out_channels,
            self.quant_conv,
        )


@dataclass(frozen=True)
class UNetConfig(_Config):
    """The SDXL UNet (Stability's ``sgm`` openaimodel layout). Levels of ``model_channels *
    channel_mult[i]`` channels with ``num_res_blocks`` ResNet blocks each, ``transformer_depth[i]``
    transformer blocks per spatial transformer (0: none at that level), heads of ``head_dim``;
    the added embedding takes the pooled text and six size conditions of ``time_id_dim`` each.
    ``head_dim`` and ``time_id_dim`` are not visible in the weights (64 and 256 in every SDXL
    checkpoint; a diffusers folder's config.json states them), so ``arch()`` leaves them out."""

    name: str
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)
    transformer_depth_middle: int = 10
    context_dim: int = 2048
    head_dim: int = 64
    adm_in_channels: int = 2816
    time_id_dim: int = 256
    norm_groups: int = 32  # GroupNorm groups (diffusers' norm_num_groups; not visible in the weights)
    # Sampling facts not visible in the weights (REFERENCE.md: SDXL).
    spacing: str = "leading"
    turbo: bool = False
    sampling: SamplingDefaults = SDXL_SAMPLING

    family = "sdxl"

    @property
    def pooled_dim(self) -> int:
        return self.adm_in_channels - 6 * self.time_id_dim

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def arch(self) -> tuple:
        return (
            self.in_channels,
            self.out_channels,
            self.model_channels,
            tuple(self.channel_mult),
            self.num_res_blocks,
            tuple(self.transformer_depth),
            self.transformer_depth_middle,
            self.context_dim,
            self.adm_in_channels,
        )

    def __post_init__(self):
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(f"{self.name}: one transformer_depth per level of channel_mult")
        if any(self.model_channels * m % self.head_dim for m in self.channel_mult):
            raise ValueError(f"{self.name}: every level's width must be a multiple of head_dim")
        if self.pooled_dim <= 0:
            raise ValueError(f"{self.name}: adm_in_channels must exceed 6 * time_id_dim")
        _check_groups(self.name, self.norm_groups, [self.model_channels * m for m in self.channel_mult])


_REGISTRY: dict[str, object] = {}


def register(config) -> None:
    if config.name in _REGISTRY:
        raise ValueError(f"config {config.name!r} is already registered")
    _REGISTRY[config.name] = config


def from_name(name: str):
    """The registered config called ``name`` (see :func:`list_models`)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def list_models(family: str | None = None, include_tiny: bool = False) -> list[str]:
    """Names of the registered configs, optionally of one family ("flux", "sd3")."""
    return sorted(
        name
        for name, cfg in _REGISTRY.items()
        if (family is None or cfg.family == family) and (include_tiny or "tiny" not in name)
    )


def configs_of(family: str) -> list:
    return [cfg for cfg in _REGISTRY.values() if cfg.family == family]


def _register_flux_variants(dev: FluxConfig, schnell: str, kontext: str) -> None:
    """dev and the two checkpoints of its architecture family: schnell (timestep-distilled, no
    guidance embedding, T5 256, no resolution shift) and Kontext (context image tokens)."""
    register(dev)
    register(
        dev.replace(
            name=schnell, guidance_embed=False, shift_schedule=False, t5_max_length=256, sampling=FLUX_SCHNELL_SAMPLING
        )
    )
    register(dev.replace(name=kontext, kontext=True, sampling=FLUX_KONTEXT_SAMPLING))


_register_flux_variants(FluxConfig(name="flux-dev"), "flux-schnell", "flux-kontext-dev")


def _register_flux_conditioned(dev: FluxConfig, fill: str, canny: str, depth: str, mask_channels: int) -> None:
    """FLUX.1 Fill (img_in: noise + masked-image latents + the 8x8 mask packed 2x2, ``mask_channels``
    = 4 f^2 for a VAE downscale f) and Canny / Depth (noise + control latents; the same tensors,
    told apart by name only: their sampling defaults differ)."""
    register(dev.replace(name=fill, in_channels=2 * dev.out_channels + mask_channels, sampling=FLUX_FILL_SAMPLING))
    register(dev.replace(name=canny, in_channels=2 * dev.out_channels, sampling=FLUX_CANNY_SAMPLING))
    register(dev.replace(name=depth, in_channels=2 * dev.out_channels, sampling=FLUX_DEPTH_SAMPLING))


def flux_conditioned_sampling(in_channels: int, out_channels: int, depth: bool = False) -> SamplingDefaults | None:
    """The sampling defaults of a FLUX.1 Fill / Canny (Depth where ``depth``) img_in width, else None."""
    if in_channels == out_channels:
        return None
    if in_channels == 2 * out_channels:
        return FLUX_DEPTH_SAMPLING if depth else FLUX_CANNY_SAMPLING
    return FLUX_FILL_SAMPLING


_register_flux_conditioned(FluxConfig(name="flux-dev"), "flux-fill-dev", "flux-canny-dev", "flux-depth-dev", 256)
# Tiny configs (REFERENCE.md 5.5): hidden 64, 2 heads of 32, axes (8, 12, 12).
_FLUX_TINY = FluxConfig(
    name="flux-tiny-dev",
    vec_in_dim=32,
    context_in_dim=48,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=(8, 12, 12),
)
_register_flux_variants(_FLUX_TINY, "flux-tiny-schnell", "flux-tiny-kontext")
# the tiny VAE downscales 2x: its Fill mask is 2x2 pixels packed 2x2 (16 channels)
_register_flux_conditioned(_FLUX_TINY, "flux-tiny-fill", "flux-tiny-canny", "flux-tiny-depth", 16)

_SD3_MEDIUM = MMDiTConfig(name="sd3-medium")
register(_SD3_MEDIUM)
_SD35_LARGE = MMDiTConfig(
    name="sd3.5-large", depth=38, hidden_size=2432, num_heads=38, qk_norm=True, sampling=SD35_SAMPLING
)
register(_SD35_LARGE)
register(_SD35_LARGE.replace(name="sd3.5-large-turbo", turbo=True, sampling=SD35_TURBO_SAMPLING))
register(
    _SD3_MEDIUM.replace(
        name="sd3.5-medium",
        pos_embed_max_size=384,
        qk_norm=True,
        dual_attention_layers=tuple(range(13)),
        sampling=SD35_SAMPLING,
    )
)

# Tiny configs (REFERENCE.md 5.5): depth 2, hidden 128, 2 heads of 64, crop limit 8 patches.
_SD3_TINY = MMDiTConfig(
    name="sd3-tiny-medium",
    depth=2,
    hidden_size=128,
    num_heads=2,
    context_in_dim=48,
    adm_in_dim=32,
    pos_embed_max_size=8,
)
register(_SD3_TINY)
register(_SD3_TINY.replace(name="sd3.5-tiny-large", qk_norm=True, sampling=SD35_SAMPLING))
register(_SD3_TINY.replace(name="sd3.5-tiny-large-turbo", qk_norm=True, turbo=True, sampling=SD35_TURBO_SAMPLING))
register(_SD3_TINY.replace(name="sd3.5-tiny-medium", qk_norm=True, dual_attention_layers=(0,), sampling=SD35_SAMPLING))

# SDXL (REFERENCE.md: SDXL): base and Turbo share the weights' shapes; sampling differs.
_SDXL = UNetConfig(name="sdxl-base")
register(_SDXL)
register(_SDXL.replace(name="sdxl-turbo", spacing="trailing", turbo=True, sampling=SDXL_TURBO_SAMPLING))
# Tiny configs: diffusers' tiny SDXL test UNet (widths 32 / 64, heads of 16, context 64, time ids 8).
_SDXL_TINY = UNetConfig(
    name="sdxl-tiny",
    model_channels=32,
    channel_mult=(1, 2),
    transformer_depth=(0, 2),
    transformer_depth_middle=2,
    context_dim=64,
    head_dim=16,
    adm_in_channels=80,
    time_id_dim=8,
    sampling=dataclasses.replace(SDXL_SAMPLING, size=(64, 64)),
)
register(_SDXL_TINY)
register(
    _SDXL_TINY.replace(
        name="sdxl-tiny-turbo",
        spacing="trailing",
        turbo=True,
        sampling=dataclasses.replace(SDXL_TURBO_SAMPLING, size=(64, 64)),
    )
)

# VAEs (REFERENCE.md 3.2-3.3): identical tensors, different latent scale / shift.
_FLUX_VAE = VAEConfig(name="flux-vae")
register(_FLUX_VAE)
register(_FLUX_VAE.replace(name="sd3-vae", scale_factor=1.5305, shift_factor=0.0609))
register(_FLUX_VAE.replace(name="vae-tiny-flux", ch=32, ch_mult=(1, 2), num_res_blocks=1))
register(
    _FLUX_VAE.replace(
        name="vae-tiny-sd3", ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=1.5305, shift_factor=0.0609
    )
)

_SDXL_VAE = _FLUX_VAE.replace(
    name="sdxl-vae", z_channels=4, scale_factor=0.13025, shift_factor=0.0, quant_conv=True, force_upcast=True
)
register(_SDXL_VAE)
register(_SDXL_VAE.replace(name="vae-tiny-sdxl", ch=32, ch_mult=(1, 2), num_res_blocks=1))

# The embedded default model (tools/train_tiny.py, fastflow/assets/fastflow-tiny-digits): 16x16
# digits, a 4-channel latent at 8x8 (4x4 tokens), no guidance embedding (true CFG instead).
register(
    FluxConfig(
        name="fastflow-tiny-digits",
        in_channels=16,
        out_channels=16,
        vec_in_dim=64,
        context_in_dim=64,
        hidden_size=96,
        num_heads=3,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
        guidance_embed=False,
        shift_schedule=False,
        t5_max_length=8,
        # 16x16 digits, trained without a guidance embedding: true CFG 1.5 (bench/quality.py)
        sampling=SamplingDefaults(steps=16, guidance=None, true_cfg=1.5, size=(16, 16), view_upscale=16),
    )
)
# The embedded UNet model (tools/train_tiny.py --family unet, fastflow/assets/fastflow-tiny-digits-unet):
# SDXL's architecture on the same 16x16 digits and VAE (8x8 latents, 4x4 at the attention level),
# eps prediction on the scaled-linear schedule; CLIP widths 32 + 32, pooled 32, time ids of 8.
register(
    UNetConfig(
        name="fastflow-tiny-digits-unet",
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(0, 1),
        transformer_depth_middle=1,
        context_dim=64,
        head_dim=32,
        adm_in_channels=80,
        time_id_dim=8,
        norm_groups=8,
        sampling=SamplingDefaults(steps=16, guidance=2.0, size=(16, 16), view_upscale=16),  # bench/quality.py
    )
)
register(
    VAEConfig(
        name="fastflow-tiny-digits-vae",
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        # the latent statistics tools/train_tiny.py normalised the flow model's training data with
        # (also in the model's vae/config.json, which the loader reads)
        scale_factor=0.7757136015516106,
        shift_factor=0.0328032560646534,
    )
)
