"""A swapped linear layer in the FLUX MLP is honoured on every backend, the Triton one included
(interpreted): the fused bias + GELU path must never bypass the layer's own forward."""

import torch

import fastflow.ops as ops
from fastflow.models import Flux, from_name
from fastflow.models.flux import make_img_ids

from ..conftest import perturbed
from ..ops.test_linear import LoraLinear


def test_lora_style_linear_in_the_flux_mlp_on_every_backend():
    torch.manual_seed(0)
    model = perturbed(Flux(from_name("flux-tiny-dev")).eval())
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 6, 64, generator=g), torch.randn(1, 3, 48, generator=g), torch.randn(1, 32, generator=g))
    kwargs = {"timesteps": torch.tensor([0.5]), "img_ids": make_img_ids(2, 3), "guidance": torch.tensor([3.5])}

    def run(backend):
        with ops.use_backend(backend), torch.no_grad():
            return model(*args, **kwargs)

    plain = run("reference")
    block = model.double_blocks[0]
    block.img_mlp[0] = LoraLinear(block.img_mlp[0], scale=2.0)
    outs = {backend: run(backend) for backend in ("reference", "kernels", "triton")}
    assert (outs["reference"] - plain).abs().max() > 1e-3  # the adapter changes the output
    for backend in ("kernels", "triton"):
        err = (outs[backend] - outs["reference"]).abs().max().item()
        assert err < 1e-5, f"{backend}: {err}"
