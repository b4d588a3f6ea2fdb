"""fastflow.accelerate on our pipelines and diffusers-like ones, and recompiles over resolutions."""

import pytest
import torch

import fastflow
from fastflow.errors import InputError
from fastflow.models import Flux, from_name
from fastflow.models.flux import make_img_ids

from ..conftest import counting_backend


def test_recompiles_over_three_resolutions_at_most_one():
    """Three image sizes in a row through our FLUX: the first compile, then at most one recompile
    (dynamo marks the changed sizes dynamic). Counted with the rewriting front half of the backend
    (the recompile decisions are dynamo's guards, not inductor's)."""
    torch.manual_seed(0)
    model = Flux(from_name("flux-tiny-dev")).eval()
    counting, compiles = counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in ((3, 5), (4, 4), (6, 2)):
            args = (
                torch.randn(1, h * w, 64, generator=g),
                torch.randn(1, 7, 48, generator=g),
                torch.randn(1, 32, generator=g),
                torch.tensor([0.5]),
                make_img_ids(h, w),
            )
            got = compiled(*args, guidance=torch.tensor([4.0]))
            torch.testing.assert_close(got, model(*args, guidance=torch.tensor([4.0])), rtol=1e-5, atol=1e-5)
    assert len(compiles) <= 2, f"{len(compiles)} compiles for three resolutions"


class _Pipe:
    def __init__(self):
        self.transformer = torch.nn.Linear(4, 4)


def test_accelerate_compiles_in_place_and_refuses_what_it_cannot_do():
    pipe = _Pipe()
    transformer = pipe.transformer
    assert fastflow.accelerate(pipe) is pipe
    assert pipe.transformer is transformer  # the pipeline keeps its module (compiled in place)
    assert transformer._compiled_call_impl is not None
    with pytest.raises(InputError, match="needs a fastflow pipeline"):
        fastflow.accelerate(_Pipe(), cache="fbcache")
    with pytest.raises(InputError, match="with a .transformer"):
        fastflow.accelerate(object())
    with pytest.raises(InputError, match="quant must be"):
        fastflow.accelerate(_Pipe(), compile=False, quant="int4")


def test_accelerate_quant_and_cache_on_a_fastflow_pipeline():
    from fastflow.quant import fp8_layers

    pipe = fastflow.load("fastflow/assets/fastflow-tiny-digits", device="cpu", dtype=torch.float32)
    fastflow.accelerate(pipe, compile=False, quant="fp8", cache="fbcache")
    assert fp8_layers(pipe.transformer)
    out = pipe("a seven", num_inference_steps=2, seed=0)
    assert out.images and pipe.defaults["cache"] == "fbcache"
    with pytest.raises(InputError):
        fastflow.accelerate(pipe, compile=False, cache="no-such-policy")


def test_diffusers_flux_over_three_resolutions_rewrites_the_dynamic_graph_too():
    """The recompile for a second resolution traces with symbolic sizes: the attention rewrite must
    match there as well (shapes compared, never hashed), with at most one recompile in all."""
    from ..compile.test_backend import _diffusers_flux, _flux_inputs

    model = _diffusers_flux(1, 1)
    counting, reports = counting_backend()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        for n in (12, 18, 24):
            kw = _flux_inputs(n=n)
            torch.testing.assert_close(compiled(**kw).sample, model(**kw).sample, rtol=1e-5, atol=1e-5)
    counts = [r["qk_norm_rope"] for r in reports]
    assert len(counts) <= 2 and all(c == 2 for c in counts), counts
