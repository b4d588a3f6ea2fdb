"""SVDPipeline against diffusers' StableVideoDiffusionPipeline: tiny random models built by
diffusers / transformers (the builders of tests/models/test_unet_video.py, test_vae_video.py,
test_clip_vision.py), converted through the key maps, run at the same generator: latents within
1e-5 relative in fp32, frames within 1/255; bad input refused before any work; FP8, the compile
backend and model CPU offload run the tiny model."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableVideoDiffusionPipeline
from PIL import Image
from transformers import CLIPImageProcessor

import fastflow
from fastflow.errors import InputError
from fastflow.models import configs
from fastflow.models.unet_video import VideoUNet
from fastflow.pipelines.offload import ModelOffload
from fastflow.pipelines.svd import SVDPipeline, VideoPipelineOutput
from fastflow.pipelines.video_images import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from tests.models.test_clip_vision import _tiny as tiny_clip
from tests.models.test_unet_video import CASES, ours_from, tiny_diffusers_svd_unet
from tests.models.test_vae_video import _convert as vae_from
from tests.models.test_vae_video import _tiny_diffusers as tiny_diffusers_vae
from tests.samplers.test_edm import SVD_SCHEDULER

# "svd": the tiny two-level UNet, 3 frames; "xt": three levels (two with attention), 5 frames
VARIANTS = {"svd": ({}, 3), "xt": (CASES["three-levels"], 5)}
SIZE = {"height": 16, "width": 24}


def _build(variant: str):
    fields, frames = VARIANTS[variant]
    cfg = configs.from_name("svd-tiny").replace(name=f"svd-tiny-{variant}", num_frames=frames, **fields)
    unet_ref = tiny_diffusers_svd_unet(cfg, seed=5)
    vae_ref = tiny_diffusers_vae(seed=3)
    clip_ref, clip = tiny_clip(seed=7, image_size=224, patch_size=32, projection_dim=cfg.context_dim)
    clip.load_state_dict(clip_ref.state_dict(), strict=True)
    scheduler = EulerDiscreteScheduler.from_config({"_class_name": "EulerDiscreteScheduler", **SVD_SCHEDULER})
    ref = StableVideoDiffusionPipeline(
        vae=vae_ref,
        image_encoder=clip_ref,
        unet=unet_ref,
        scheduler=scheduler,
        feature_extractor=CLIPImageProcessor(image_mean=list(CLIP_IMAGE_MEAN), image_std=list(CLIP_IMAGE_STD)),
    )
    ref.set_progress_bar_config(disable=True)
    ours = SVDPipeline(ours_from(unet_ref, cfg), vae_from(vae_ref), clip.eval(), cfg, scheduler=dict(SVD_SCHEDULER))
    ours.set_progress_bar_config(disable=True)
    return ref, ours


@pytest.fixture(scope="module", params=list(VARIANTS))
def pipes(request):
    return _build(request.param)


@pytest.fixture(scope="module")
def svd():
    return _build("svd")


def _image(h=30, w=40, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rel(a, b):
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    return ((a - b).abs().max() / b.abs().max()).item()


# 6 steps: with 2, the first Euler step jumps from sigma 700 to 0.002 and cancels values of 700 x the
# noise in fp32, so the rounding of either side (thread counts, op order) shows as 3e-5 even with
# diffusers' own UNet and VAE in both pipelines; from 3 steps on, 2e-6 to 9e-6 (measured here)
KW = {**SIZE, "num_inference_steps": 6}


@pytest.mark.parametrize("max_guidance", [2.5, 1.0])
def test_latents_and_frames_equal_diffusers(pipes, max_guidance):
    ref, ours = pipes
    kw = {**KW, "max_guidance_scale": max_guidance, "min_guidance_scale": 1.0, "fps": 6, "motion_bucket_id": 90}
    want = ref(_image(), generator=_gen(), output_type="latent", **kw).frames
    got = ours(_image(), generator=_gen(), output_type="latent", **kw)
    assert isinstance(got, VideoPipelineOutput) and got.frames.shape == want.shape
    assert got.frames.shape == (1, ours.config.num_frames, 4, 8, 12)
    assert _rel(got.frames, want) <= 1e-5
    assert got.settings["guidance"] is (max_guidance > 1) and got.settings["fps"] == 6
    want = ref(_image(), generator=_gen(), output_type="np", **kw).frames
    got = ours(_image(), generator=_gen(), output_type="np", **kw).frames
    assert got.shape == want.shape == (1, ours.config.num_frames, 16, 24, 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1 / 255


def test_the_draw_order_and_the_conditioning_matter(svd):
    """Each reference input changes the result: the test can fail (seed, fps, motion, augmentation)."""
    _, ours = svd
    base = ours(_image(), generator=_gen(), output_type="latent", **KW).frames
    for change in ({"fps": 8}, {"motion_bucket_id": 30}, {"noise_aug_strength": 0.1}, {"max_guidance_scale": 4.0}):
        other = ours(_image(), generator=_gen(), output_type="latent", **KW, **change).frames
        assert _rel(other, base) > 1e-4, change
    assert _rel(ours(_image(), generator=_gen(1), output_type="latent", **KW).frames, base) > 1e-2


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_decode_equals_diffusers(svd, chunk):
    ref, ours = svd
    want = ref(_image(), generator=_gen(), output_type="pt", decode_chunk_size=chunk, **KW).frames
    got = ours(_image(), generator=_gen(), output_type="pt", decode_chunk_size=chunk, **KW)
    assert got.frames.shape == want.shape == (1, 3, 3, 16, 24)
    assert (got.frames - want).abs().max() <= 1 / 255
    assert got.settings["decode_chunk_size"] == chunk
    full = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    assert (full - got.frames).abs().max() > 1e-4  # the temporal decoder sees the chunk only


def test_pil_output_and_several_videos_equal_diffusers(svd):
    ref, ours = svd
    kw = {**KW, "num_videos_per_prompt": 2, "max_guidance_scale": 2.0}
    want = ref(_image(), generator=_gen(2), output_type="pil", **kw).frames
    got = ours(_image(), generator=_gen(2), output_type="pil", **kw).frames
    assert len(got) == len(want) == 2 and all(len(clip) == 3 for clip in got)
    for a, b in zip(got, want, strict=True):
        for fa, fb in zip(a, b, strict=True):
            assert fa.size == fb.size == (24, 16)
            assert np.abs(np.asarray(fa, dtype=int) - np.asarray(fb, dtype=int)).max() <= 1
    assert np.abs(np.asarray(got[0][1], dtype=int) - np.asarray(got[1][1], dtype=int)).max() > 0


@pytest.mark.parametrize("form", ["tensor", "two images"])
def test_tensor_images_and_batches_equal_diffusers(svd, form):
    """A [B, 3, 224, 224] tensor in [0, 1] (CLIP unresized, the VAE's input by nearest resize), and a
    list of two PIL images (one video each)."""
    ref, ours = svd
    if form == "tensor":
        image = torch.rand(1, 3, 224, 224, generator=_gen(8))
    else:
        image = [_image(seed=1), _image(seed=2)]
    want = ref(image, generator=_gen(3), output_type="latent", **KW).frames
    got = ours(image, generator=_gen(3), output_type="latent", **KW).frames
    assert got.shape == want.shape and got.shape[0] == (1 if form == "tensor" else 2)
    assert _rel(got, want) <= 1e-5


def test_seeds_are_a_list_of_generators(svd):
    """seed=s gives video i the generator manual_seed(s + i): diffusers with that generator list."""
    ref, ours = svd
    kw = {**KW, "num_videos_per_prompt": 2}
    gens = [_gen(11), _gen(12)]
    want = ref(_image(), generator=gens, output_type="latent", **kw).frames
    got = ours(_image(), seed=11, output_type="latent", **kw)
    assert got.seeds == [11, 12] and _rel(got.frames, want) <= 1e-5
    tensors = ours(_image(), seed=11, output_type="latent", return_dict=False, **kw)
    assert isinstance(tensors, tuple) and torch.equal(tensors[0], got.frames)


def test_given_latents_and_the_step_callback(svd):
    ref, ours = svd
    latents = torch.randn(1, 3, 4, 8, 12, generator=_gen(4))  # unit noise: both scale it by sqrt(700^2 + 1)
    seen = []

    def on_step(pipe, i, t, tensors):
        seen.append(float(t))
        return tensors

    want = ref(_image(), generator=_gen(), latents=latents.clone(), output_type="latent", **KW).frames
    got = ours(_image(), generator=_gen(), latents=latents, output_type="latent", callback_on_step_end=on_step, **KW)
    assert _rel(got.frames, want) <= 1e-5
    assert seen == pytest.approx([float(t) for t in ref.scheduler.timesteps])


def test_progress_bars_over_steps_and_decode_chunks(svd, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)
            self.updates = []

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    _, ours = svd
    ours(_image(), generator=_gen(), output_type="np", decode_chunk_size=2, progress=True, **KW)
    assert [(b.desc, b.total, b.updates) for b in bars] == [("denoising", 6, [1] * 6), ("decoding", 3, [2, 1])]


def test_bfloat16_follows_float32(svd):
    """pipe.to(dtype) casts the image encoder with the UNet and VAE; bf16 stays near fp32."""
    _, ours = svd
    want = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    try:
        ours.to(torch.bfloat16)
        assert ours.image_encoder.dtype == ours.unet.dtype == torch.bfloat16
        got = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    finally:
        ours.to(torch.float32)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1


BAD = [
    ({"image": None}, "needs image"),
    ({"image": "nowhere.png"}, "not found"),
    ({"image": 3}, "image must be"),
    ({"image": torch.rand(1, 3, 8, 8) * 2 - 1}, r"\[0, 1\]"),
    ({"height": 18}, "multiple of 4"),
    ({"width": 0}, "multiple of 4"),
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 10_000}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"fps": float("nan")}, "fps"),
    ({"motion_bucket_id": -1}, "motion_bucket_id"),
    ({"motion_bucket_id": 600}, "motion_bucket_id"),
    ({"noise_aug_strength": -0.1}, "noise_aug_strength"),
    ({"noise_aug_strength": 5.0}, "noise_aug_strength"),
    ({"decode_chunk_size": 0}, "decode_chunk_size"),
    ({"num_videos_per_prompt": 0}, "num_videos_per_prompt"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"min_guidance_scale": 2.0, "max_guidance_scale": 1.0}, "max_guidance_scale"),
    ({"output_type": "gif"}, "output_type"),
    ({"seed": 1, "generator": torch.Generator()}, "not both"),
    ({"latents": torch.zeros(1, 2, 4, 8, 12)}, "latents must be"),
    ({"guidance_scale": 2.0}, "unexpected keyword"),
]


@pytest.mark.parametrize(("change", "match"), BAD)
def test_bad_input_is_refused_before_work(svd, monkeypatch, change, match):
    _, ours = svd

    def no_work(*a, **k):
        raise AssertionError("a model ran")

    for model in (ours.unet, ours.vae.decoder, ours.image_encoder):
        monkeypatch.setattr(model, "forward", no_work)
    with pytest.raises(InputError, match=match):
        ours(**{"image": _image(), **KW, **change})


def test_the_size_multiple_follows_the_models():
    """64 at full size: the VAE's 8 and the UNet's three halvings (meta device, no weights)."""
    with torch.device("meta"):
        unet = VideoUNet(configs.from_name("svd"))
    vae = type("V", (), {"downscale": 8})()
    assert SVDPipeline(unet, vae, torch.nn.Linear(1, 1)).multiple == 64


def test_a_scheduler_config_that_changes_the_math_is_refused(svd):
    _, ours = svd
    with pytest.raises(InputError, match="prediction_type"):
        SVDPipeline(ours.unet, ours.vae, ours.image_encoder, scheduler={**SVD_SCHEDULER, "prediction_type": "epsilon"})


def test_model_cpu_offload_runs_each_stage(svd, monkeypatch):
    _, ours = svd
    want = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    log = []
    real = ModelOffload.move
    monkeypatch.setattr(ModelOffload, "move", lambda self, name, device: log.append(name) or real(self, name, device))
    try:
        ours.enable_model_cpu_offload(device="cpu")
        assert ours._offload.groups["text"] == [ours.image_encoder]
        log.clear()
        got = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    finally:
        ours.disable_model_cpu_offload()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    onto = [name for i, name in enumerate(log) if i % 2 == 0]  # to the device, back, to the device, ...
    assert onto[:3] == ["text", "vae", "transformer"] and "vae" in log[3:]


def test_fp8_runs_the_tiny_model():
    from fastflow.quant import Fp8Linear

    _, ours = _build("svd")
    fastflow.accelerate(ours, compile=False, quant="fp8")
    assert any(isinstance(m, Fp8Linear) for m in ours.unet.modules())
    out = ours(_image(), generator=_gen(), output_type="pt", **KW).frames
    assert out.shape == (1, 3, 3, 16, 24) and torch.isfinite(out).all()


def test_accelerate_compiles_the_unet():
    _, ours = _build("svd")
    assert fastflow.accelerate(ours) is ours
    assert ours.unet._compiled_call_impl is not None


@pytest.mark.slow  # inductor on 2 CPU cores
def test_compiled_pipeline_equals_eager():
    _, ours = _build("svd")
    want = ours(_image(), generator=_gen(), output_type="latent", **KW).frames
    torch._dynamo.reset()
    fastflow.accelerate(ours)
    got = ours(_image(), generator=_gen(), output_type="latent", **KW).frames
    assert _rel(got, want) <= 1e-5


# -- fastflow.load and the CLI --------------------------------------------------------------------


def test_load_without_the_svd_loader_keeps_the_image_families(monkeypatch, tmp_path):
    """api._load_video gives None where fastflow.loading.svd is not installed (main before the loader)."""
    import importlib.util

    from fastflow import api

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastflow.loading.svd" else
                        real(name, *a))  # fmt: skip
    assert api._load_video(tmp_path, None, "cpu", torch.float32, None, None, None, None, None, []) is None


def test_load_builds_the_pipeline_from_the_loaders_components(monkeypatch, svd, tmp_path):
    """fastflow.load's SVD branch against the loader's interface (is_svd, load_svd -> SVDComponents),
    here stand-ins: the arguments passed on, the image families' arguments refused."""
    import types

    import fastflow.api

    _, ours = svd
    calls = []
    monkeypatch.setattr(fastflow.api, "is_svd", lambda path: True)
    monkeypatch.setattr(fastflow.api, "load_svd", lambda path, **kw: calls.append((path, kw)) or types.SimpleNamespace(
        unet=ours.unet, vae=ours.vae, image_encoder=ours.image_encoder, config=ours.config,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25), scheduler=dict(SVD_SCHEDULER),
    ))  # fmt: skip
    pipe = fastflow.load(tmp_path, device="cpu", dtype=torch.float32, quant="fp8", variant="svd-xt")
    assert isinstance(pipe, SVDPipeline) and pipe.unet is ours.unet and pipe.image_std == (0.25, 0.25, 0.25)
    assert calls == [(tmp_path, {"variant": "svd-xt", "device": "cpu", "dtype": torch.float32, "quant": "fp8"})]
    with pytest.raises(InputError, match="vae"):
        fastflow.load(tmp_path, device="cpu", vae=tmp_path)


def _cli(*argv):
    from fastflow.cli import main

    return main(["generate", *map(str, argv)])


@pytest.fixture
def video_cli(monkeypatch, svd):
    """The CLI's video branch with the tiny pipeline standing in for fastflow.load's (the loader is
    another module); records load()'s arguments."""
    from fastflow import api
    from fastflow.cli import video

    calls = []
    monkeypatch.setattr(video, "is_video_model", lambda path: True)
    monkeypatch.setattr(api, "load", lambda path, **kw: calls.append((path, kw)) or svd[1])
    return calls


@pytest.mark.parametrize("suffix", [".gif", ".mp4", ".webp"])
def test_cli_writes_a_clip(video_cli, tmp_path, capsys, suffix):
    from PIL import Image as PILImage

    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / f"clip{suffix}"
    args = ["--model", tmp_path, "--image", src, "-o", out, "-H", 16, "-W", 24, "--steps", 2, "--frames", 4]
    args += ["--fps", 8, "--motion-bucket", 60, "--noise-aug", 0.05, "--decode-chunk", 2, "--max-guidance", 2.0]
    assert _cli(*args, "--seed", 3) == 0
    assert out.is_file() and out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    if suffix != ".mp4":
        with PILImage.open(out) as clip:
            assert clip.n_frames == 4 and clip.size == (24, 16)
    else:
        import av

        with av.open(str(out)) as clip:
            assert len(list(clip.decode(video=0))) == 4
    assert _cli(*args, "--seed", 3) == 0 and out.with_name(f"clip-1{suffix}").is_file()  # never overwritten
    assert video_cli[0][1]["device"] == "cpu"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["a cat"], "not from a prompt"),
        (["--guidance", 3], "--guidance"),
        (["--fps", 0], "fps"),
        (["--frames", 0], "num_frames"),
        (["--decode-chunk", 0], "decode_chunk_size"),
        (["-o", "clip.txt"], "writes .mp4"),
    ],
)
def test_cli_video_errors(video_cli, tmp_path, capsys, extra, match):
    src = tmp_path / "in.png"
    _image().save(src)
    args = ["--model", tmp_path, "--image", src, "-o", tmp_path / "c.gif", "-H", 16, "-W", 24, "--steps", 1]
    assert _cli(*args, *extra) == 2
    assert match in capsys.readouterr().err
    assert not list(tmp_path.glob("c*.gif"))


def test_cli_video_needs_an_image(video_cli, tmp_path, capsys):
    assert _cli("--model", tmp_path, "-o", tmp_path / "c.gif") == 2
    assert "--image" in capsys.readouterr().err and not video_cli


@pytest.mark.parametrize(("extra", "match"), [(["-o", "clip.mp4"], "image model"), (["--fps", 8], "video option")])
def test_cli_image_model_refuses_video_options(tmp_path, capsys, extra, match):
    assert _cli("a cat", "-o", tmp_path / "x.png", *extra) == 2
    assert match in capsys.readouterr().err


# -- through a saved diffusers folder and the SVD loader ------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.conftest import tiny_svd_folder

    return tiny_svd_folder(tmp_path_factory.mktemp("svd") / "svd-tiny", num_frames=4)


def test_a_saved_folder_loads_to_diffusers_numbers(folder):
    ref = StableVideoDiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    pipe = fastflow.load(folder, device="cpu", dtype=torch.float32)
    assert isinstance(pipe, SVDPipeline) and pipe.config.num_frames == 4
    kw = {**KW, "max_guidance_scale": 2.0}
    want = ref(_image(), generator=_gen(), output_type="latent", **kw).frames
    got = pipe(_image(), generator=_gen(), output_type="latent", **kw).frames
    assert got.shape == want.shape == (1, 4, 4, 8, 12) and _rel(got, want) <= 1e-5


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_cli_through_the_folder(folder, tmp_path, capsys, suffix):
    from PIL import Image as PILImage

    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / f"clip{suffix}"
    args = ["--model", folder, "--image", src, "-o", out, "-H", 16, "-W", 24, "--steps", 2, "--seed", 1]
    assert _cli(*args, "--dtype", "float32", "--decode-chunk", 2, "--no-progress") == 0, capsys.readouterr().err
    if suffix == ".gif":
        with PILImage.open(out) as clip:
            assert clip.n_frames == 4 and clip.size == (24, 16)
    else:
        import av

        with av.open(str(out)) as clip:
            assert len(list(clip.decode(video=0))) == 4
    assert _cli("a cat", "--model", folder, "--image", src, "-o", tmp_path / "x.gif") == 2
    assert "not from a prompt" in capsys.readouterr().err
