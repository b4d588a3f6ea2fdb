"""Whole tiny models with every Triton kernel (interpreted) against the reference backend."""

import pytest
import torch

import fastflow.ops as ops
from fastflow.models import AutoEncoder, Flux, MMDiT, from_name
from fastflow.models.flux import make_img_ids


def _same(run, dtype, tol):
    with ops.use_backend("reference"):
        expected = run()
    with ops.use_backend("triton"):
        got = run()
    err = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
    assert err <= tol, f"{dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_tiny_flux(dtype, tol):
    torch.manual_seed(0)
    model = Flux(from_name("flux-tiny-dev")).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    img, txt, y = (
        torch.randn(2, 15, 64, generator=g),
        torch.randn(2, 7, 48, generator=g),
        torch.randn(2, 32, generator=g),
    )
    cond = torch.randn(2, 4, 64, generator=g)

    @torch.no_grad()
    def run():
        return model(
            img,
            txt,
            y,
            torch.tensor([0.5, 0.25]),
            make_img_ids(3, 5),
            guidance=torch.tensor([4.0, 2.0]),
            img_cond=cond,
            img_cond_ids=make_img_ids(2, 2, index=1),
        )

    _same(run, dtype, tol)


@pytest.mark.parametrize("variant", ["sd3-tiny-medium", "sd3.5-tiny-medium"])
def test_tiny_mmdit(variant):
    torch.manual_seed(0)
    model = MMDiT(from_name(variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # zero-init gates would hide most of the blocks
    g = torch.Generator().manual_seed(1)
    x, ctx, y = (
        torch.randn(1, 16, 8, 6, generator=g),
        torch.randn(1, 5, 48, generator=g),
        torch.randn(1, 32, generator=g),
    )
    _same(torch.no_grad()(lambda: model(x, torch.tensor([600.0]), ctx, y)), torch.float32, 1e-5)


def test_tiny_vae_decode():
    torch.manual_seed(0)
    vae = AutoEncoder(from_name("vae-tiny-flux")).eval()
    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(1))
    _same(torch.no_grad()(lambda: vae.decode(z)), torch.float32, 1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_tiny_flux_fp8(dtype, tol):
    """Every linear layer FP8 (the modulated ones through the fused LayerNorm + quantization kernel).
    Measured: 3e-7 (fp32) and 7e-3 (bf16, 4e-3 without FP8) relative error."""
    from fastflow.quant import Fp8Config, fp8_layers, quantize_

    torch.manual_seed(0)
    model = quantize_(Flux(from_name("flux-tiny-dev")).to(dtype).eval(), Fp8Config(skip=()))
    assert len(fp8_layers(model)) > 20
    g = torch.Generator().manual_seed(1)
    img, txt, y = (
        torch.randn(2, 15, 64, generator=g),
        torch.randn(2, 7, 48, generator=g),
        torch.randn(2, 32, generator=g),
    )

    @torch.no_grad()
    def run():
        return model(img, txt, y, torch.tensor([0.5, 0.25]), make_img_ids(3, 5), guidance=torch.tensor([4.0, 2.0]))

    _same(run, dtype, tol)


def test_tiny_mmdit_fp8():
    """SD3.5 (MMDiT-X: attn2, qk-norm) with every linear FP8, fused boundaries included."""
    from fastflow.quant import Fp8Config, quantize_

    torch.manual_seed(0)
    model = MMDiT(from_name("sd3.5-tiny-medium")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    quantize_(model, Fp8Config(skip=()))
    g = torch.Generator().manual_seed(1)
    x, ctx, y = (
        torch.randn(1, 16, 8, 6, generator=g),
        torch.randn(1, 5, 48, generator=g),
        torch.randn(1, 32, generator=g),
    )
    _same(torch.no_grad()(lambda: model(x, torch.tensor([600.0]), ctx, y)), torch.float32, 1e-4)
