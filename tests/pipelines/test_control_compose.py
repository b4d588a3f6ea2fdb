"""Issue 35, ControlNets composed with the rest of fastflow, on the tiny SDXL, SD3 and FLUX ControlNets
of test_controlnet*.py: model CPU offload (the nets move with the transformer; results unchanged),
pipe.to (the nets follow), a LoRA on the base model (equal to the base with the LoRA merged by hand,
fused or not, scale switching; the nets untouched; ControlNet keys refused), the compile backend
(the nets compiled too, no graph breaks, results within the compile tests' tolerance; FP8 + compile),
caching + LoRA."""

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

import fastflow
import fastflow.compile as fc
from fastflow.adapters import LoraLinear
from fastflow.adapters.formats import linear_layers
from fastflow.errors import LoraError
from fastflow.pipelines.offload import ModelOffload

from ..conftest import counting_backend, tiny_pipeline_folder
from .test_controlnet import SD3_H, SD3_W, _image, _rel, sd3_controlnet, sdxl_controlnet
from .test_controlnet import H as SDXL_H
from .test_controlnet import W as SDXL_W
from .test_controlnet_flux import H as FLUX_H
from .test_controlnet_flux import W as FLUX_W
from .test_controlnet_flux import flux_controlnet

FAMILIES = {  # base variant, (height, width)
    "sdxl": ("sdxl-tiny", (SDXL_H, SDXL_W)),
    "sd3": ("sd3.5-tiny-medium", (SD3_H, SD3_W)),
    "flux": ("flux-tiny-dev", (FLUX_H, FLUX_W)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    out = {family: tiny_pipeline_folder(root / family, variant) for family, (variant, _) in FAMILIES.items()}
    sdxl_controlnet(out["sdxl"], 10).save_pretrained(root / "cn-sdxl")
    sd3_controlnet(out["sd3"], 12).save_pretrained(root / "cn-sd3")
    flux_controlnet(FluxTransformer2DModel.from_pretrained(out["flux"] / "transformer"), 11).save_pretrained(
        root / "cn-flux"
    )
    out.update({f"cn-{family}": root / f"cn-{family}" for family in FAMILIES})
    return out


def _load(folders, family, net=True, **kw):
    pipe = fastflow.load(folders[family], dtype=torch.float32, device="cpu",
                         controlnet=folders[f"cn-{family}"] if net else None, **kw)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _kw(family, steps=3):
    h, w = FAMILIES[family][1]
    return dict(height=h, width=w, num_inference_steps=steps, seed=3, output_type="latent",
                control_image=_image(1, h, w), controlnet_conditioning_scale=0.8)  # fmt: skip


# -- offload ---------------------------------------------------------------------------------------


@pytest.fixture
def moves(monkeypatch):
    """(group, "exec" / "storage", the ids of the modules moved) of every offload move."""
    log = []
    real = ModelOffload.move

    def move(self, name, device):
        log.append((name, "exec" if device == self.device else "storage", {id(m) for m in self.groups[name]}))
        real(self, name, device)

    monkeypatch.setattr(ModelOffload, "move", move)
    return log


def _offloaded(pipe):
    """Offload with "cpu" as the execution device and "cpu:0" as storage (as test_offload.py: a
    tensor's device reads "cpu" for both, so the move log says where each group went)."""
    pipe.enable_model_cpu_offload(device="cpu")
    pipe._offload.storage = torch.device("cpu", 0)
    for name in pipe._offload.groups:
        pipe._offload.move(name, pipe._offload.storage)
    return pipe


def _where(moves, module) -> str | None:
    """Where the offload last sent ``module`` ("exec" / "storage"), None if it never moved it."""
    sent = [where for _, where, ids in moves if id(module) in ids]
    return sent[-1] if sent else None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_offload_moves_the_nets_with_the_transformer(folders, moves, family):
    plain = _load(folders, family)("a cat", **_kw(family)).images
    pipe = _offloaded(_load(folders, family))
    net = pipe.controlnets[0]
    assert _where(moves, net) == "storage"  # waits in CPU memory with the transformer
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append((pipe._offload.resident, _where(moves, module))))
    moves.clear()
    out = pipe("a cat", **_kw(family)).images
    assert seen and set(seen) == {("transformer", "exec")}  # on the execution device in the loop
    assert _where(moves, net) == "storage" and pipe._offload.resident is None  # back after the call
    assert [(n, w) for n, w, _ in moves if n == "transformer"] == [("transformer", "exec"), ("transformer", "storage")]
    assert torch.equal(out, plain)


def test_nets_attached_after_enabling_offload_join_the_transformer_stage(folders, moves):
    pipe = _offloaded(_load(folders, "sd3", net=False))
    nets = _load(folders, "sd3").controlnets
    pipe.controlnets = nets  # as fastflow.load's attach_controlnets
    seen = []
    nets[0].register_forward_pre_hook(lambda module, args: seen.append(_where(moves, module)))
    pipe("a cat", **_kw("sd3", steps=2))
    assert seen and set(seen) == {"exec"} and _where(moves, nets[0]) == "storage"


def test_pipe_to_moves_and_casts_the_nets(folders, monkeypatch):
    pipe = _load(folders, "sdxl")
    net = pipe.controlnets[0]
    calls = []
    real = type(net).to
    monkeypatch.setattr(type(net), "to", lambda self, *a, **k: calls.append(k) or real(self, *a, **k))
    assert pipe.to(torch.float64) is pipe and net.dtype == torch.float64
    pipe.to("cpu", torch.float32)
    assert net.dtype == torch.float32 and calls[-1] == {"device": torch.device("cpu"), "dtype": torch.float32}
    _offloaded(pipe)
    pipe.to(torch.float64)  # a cast alone is allowed with the offload on
    assert net.dtype == torch.float64


# -- LoRA on the base model --------------------------------------------------------------------------

RANK = 4


def _lora(transformer, seed, every=3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our layer name -> (down [r, in], up [out, r]) on every ``every``-th linear layer."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in sorted(linear_layers(transformer).items())[::every]:
        rows, cols = layer.weight.shape
        out[name] = (torch.randn(RANK, cols, generator=g) * 0.15, torch.randn(rows, RANK, generator=g) * 0.15)
    return out


def _save(path, pairs, extra=None):
    state = {}
    for name, (down, up) in pairs.items():
        state[f"transformer.{name}.lora_A.weight"] = down
        state[f"transformer.{name}.lora_B.weight"] = up
    save_file({**state, **(extra or {})}, str(path))
    return path


def _merged_by_hand(pipe, pairs, scale):
    """The base model's weights + scale x up @ down (PEFT's math, alpha = rank)."""
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            layer = pipe.transformer.get_submodule(name)
            layer.weight += scale * (up @ down)
    return pipe


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_the_base_model_with_a_controlnet(folders, tmp_path, family):
    kw = _kw(family)
    pipe = _load(folders, family)
    net_weights = _state(pipe.controlnets[0])
    plain = pipe("a cat", **kw).images
    pairs = _lora(pipe.transformer, seed=5)
    name = pipe.load_lora(_save(tmp_path / "style.safetensors", pairs), scale=0.7)
    unfused = pipe("a cat", **kw).images
    by_hand = _merged_by_hand(_load(folders, family), pairs, 0.7)("a cat", **kw).images
    assert _rel(by_hand, plain) > 1e-3  # the LoRA changes the result
    assert _rel(unfused, by_hand) <= 1e-5
    pipe.fuse_lora()
    assert _rel(pipe("a cat", **kw).images, by_hand) <= 1e-6
    pipe.unfuse_lora()
    pipe.set_lora_scales({name: 0.3})
    switched = pipe("a cat", **kw).images
    pipe.fuse_lora()
    fused = pipe("a cat", **kw).images
    assert _rel(switched, fused) <= 1e-5  # unfused scale switching: the fused numbers
    assert _rel(fused, _merged_by_hand(_load(folders, family), pairs, 0.3)("a cat", **kw).images) <= 1e-6
    pipe.unfuse_lora()
    pipe.set_lora_scales({name: 0.0})
    assert torch.equal(pipe("a cat", **kw).images, plain)  # scale 0: no LoRA
    net = pipe.controlnets[0]  # the ControlNet is never touched (diffusers' load_lora_weights neither)
    assert not any(isinstance(m, LoraLinear) for m in net.modules())
    assert all(torch.equal(v, net_weights[k]) for k, v in net.state_dict().items())
    pipe.unload_lora()
    assert torch.equal(pipe("a cat", **kw).images, plain)


def test_lora_with_controlnet_keys_is_refused_and_leaves_nothing(folders, tmp_path):
    pipe = _load(folders, "flux")
    before = _state(pipe.transformer)
    pairs = _lora(pipe.transformer, seed=6)
    cn = {"controlnet.controlnet_blocks.0.lora_A.weight": torch.zeros(RANK, 32),
          "controlnet.controlnet_blocks.0.lora_B.weight": torch.zeros(32, RANK)}  # fmt: skip
    path = _save(tmp_path / "with-cn.safetensors", pairs, cn)
    for fuse in (False, True):
        with pytest.raises(LoraError, match="ControlNet's layers.*controlnet.controlnet_blocks.0"):
            pipe.load_lora(path, fuse=fuse)
        assert pipe.loras == {}
        assert not any(isinstance(m, LoraLinear) for m in pipe.transformer.modules())
        assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    only_cn = tmp_path / "only-cn.safetensors"
    save_file(cn, str(only_cn))
    with pytest.raises(LoraError):  # no key for the base model at all
        pipe.load_lora(only_cn)
    odd = {"odd.lora_A.weight": torch.zeros(RANK, 3), "odd.lora_B.weight": torch.zeros(3, RANK)}
    with pytest.warns(UserWarning, match="match no layer"):  # other unmatched keys: still a warning
        pipe.load_lora(_save(tmp_path / "odd.safetensors", pairs, odd))


# -- compile -------------------------------------------------------------------------------------------


class _ProjectedResidual(torch.nn.Module):
    """A block output r (gated residual) projected before the next block's modulation (a ControlNet's
    output layer) and then normalised with it: ``late`` computes the modulation after the projection."""

    def __init__(self, late: bool):
        super().__init__()
        self.late, self.out, self.mod = late, torch.nn.Linear(16, 16), torch.nn.Linear(16, 32)

    def forward(self, x, gate, vec):
        r = x + gate.unsqueeze(1) * x.flip(1)
        if not self.late:
            shift, scale = self.mod(vec).chunk(2, dim=-1)
        residual = self.out(r)
        if self.late:
            shift, scale = self.mod(vec).chunk(2, dim=-1)
        h = torch.nn.functional.layer_norm(r, (16,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        return residual, h


@pytest.mark.parametrize("late", [False, True])
def test_boundary_rewrite_keeps_the_graph_ordered_when_the_block_output_is_used_early(late):
    """The combined gated-residual + modulated-norm op goes after its last input; when the output is
    used before the modulation exists (``late``), the two ops stay separate (was: an invalid graph)."""
    counts = {}

    def capture(gm, example_inputs):
        counts.update(fc.rewrite(gm, example_inputs))  # lints the graph
        return gm.forward

    g = torch.Generator().manual_seed(0)
    x, gate, vec = torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)
    module = _ProjectedResidual(late)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = module(x, gate, vec)
        got = torch.compile(module, backend=capture, fullgraph=True)(x, gate, vec)
    assert counts["gated_residual_layernorm_modulate"] == (0 if late else 1)
    assert counts["layernorm_modulate"] == 1 and counts["gated_residual"] == 1
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nets_compile_without_graph_breaks(folders, family):
    """The transformer and the nets through the backend's rewrites with fullgraph=True (a graph
    break raises); results equal to eager within the compile tests' tolerance."""
    pipe = _load(folders, family)
    kw = _kw(family, steps=2)
    eager = pipe("a cat", **kw).images
    backend, reports = counting_backend()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = pipe.controlnets[0]
    net.compile(backend=backend, fullgraph=True)
    compiled = pipe("a cat", **kw).images
    assert reports, "the ControlNet was not compiled"
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_accelerate_marks_the_sdxl_nets_compiled(folders):
    """SDXL: the nets (and the UNet) are compiled in place (the run is in the slow test below)."""
    pipe = _load(folders, "sdxl")
    net = pipe.controlnets[0]
    assert fastflow.accelerate(pipe) is pipe and pipe.controlnets[0] is net
    assert net._compiled_call_impl is not None and pipe.transformer._compiled_call_impl is not None
    assert pipe.defaults["precompute_modulation"] is False


@pytest.mark.slow  # (SDXL: minutes of inductor on 2 CPU cores without its cache)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_accelerate_compiles_the_nets(folders, monkeypatch, family):
    """fastflow.accelerate end to end (inductor): the same latents as eager within the compile
    tests' tolerance, no graph break in the transformer or the nets."""
    pipe = _load(folders, family)
    kw = _kw(family, steps=2)
    eager = pipe("a cat", **kw).images
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []  # the tensors (parameters included) of each graph the "fastflow" backend compiles
    rewrite = fc.rewrite
    monkeypatch.setattr(fc, "rewrite", lambda gm, inputs, *a, **k: graphs.append(
        {t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)}) or rewrite(gm, inputs, *a, **k))  # fmt: skip
    net = pipe.controlnets[0]
    assert fastflow.accelerate(pipe) is pipe and pipe.controlnets[0] is net
    assert net._compiled_call_impl is not None and pipe.transformer._compiled_call_impl is not None
    got = pipe("a cat", **kw).images
    # relative to the latents' largest value (5 to 15 here): the pipeline without a net, compiled,
    # differs from eager as much (without / with the net: SDXL 4.7e-6 / 5.5e-6, SD3 8.1e-6 / 7.5e-6,
    # FLUX 7.7e-6 / 6.9e-6)
    assert _rel(got, eager) <= 1e-5
    assert not torch._dynamo.utils.counters["graph_break"]
    for model in (net, pipe.transformer):  # each went through the backend
        weights = {p.data_ptr() for p in model.parameters()}
        assert any(weights & graph for graph in graphs), type(model).__name__


@pytest.mark.slow
def test_fp8_controlnet_and_compile(folders):
    from fastflow.quant import Fp8Linear

    pipe = _load(folders, "sd3")
    torch._dynamo.reset()
    fastflow.accelerate(pipe, quant="fp8")
    assert any(isinstance(m, Fp8Linear) for m in pipe.controlnets[0].modules())
    out = pipe("a cat", **_kw("sd3", steps=2)).images
    assert torch.isfinite(out).all()


# -- caching + LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])  # (SDXL's UNet has no block loop to cache)
def test_caching_with_a_controlnet_and_a_lora(folders, tmp_path, family):
    pipe = _load(folders, family)
    pipe.load_lora(_save(tmp_path / "l.safetensors", _lora(pipe.transformer, seed=8)), scale=0.5)
    kw = _kw(family, steps=4)
    plain = pipe("a cat", **kw).images
    every = pipe("a cat", cache="fbcache", cache_threshold=0.0, **kw)
    assert every.stats["blocks_computed"] == every.stats["blocks_total"]
    assert torch.equal(every.images, plain)
    cached = pipe("a cat", cache="fbcache", cache_threshold=0.5, **kw)
    assert torch.isfinite(cached.images).all()
