"""Parity of our FLUX transformer with diffusers' FluxTransformer2DModel (the reference).

Weights go through our diffusers-format mapping, so these tests check the key map, the forward
math and the numerics together. Batch 2, a non-square 3x5 token grid, 7 text tokens.
"""

import copy

import pytest
import torch

import fastflow
from fastflow.models.flux import make_img_ids

from ..conftest import tiny_diffusers_flux

B, H_TOK, W_TOK, N_TXT = 2, 3, 5, 7
# Timesteps and guidance whose x1000 values are exact in bf16, so that the bf16 run is compared
# with an fp32 run of the same conditioning (t and g are rounded to bf16 by design, REFERENCE 7.2).
T = torch.tensor([0.5, 0.25])
G = torch.tensor([4.0, 2.0])


def _inputs(cfg, seed=0, cond_grid=None):
    g = torch.Generator().manual_seed(seed)
    x = {
        "img": torch.randn(B, H_TOK * W_TOK, cfg.in_channels, generator=g),
        "txt": torch.randn(B, N_TXT, cfg.context_in_dim, generator=g),
        "y": torch.randn(B, cfg.vec_in_dim, generator=g),
        "img_ids": make_img_ids(H_TOK, W_TOK),
        "txt_ids": torch.zeros(N_TXT, 3),
        "guidance": G if cfg.guidance_embed else None,
    }
    if cond_grid:
        x["img_cond"] = torch.randn(B, cond_grid[0] * cond_grid[1], cfg.in_channels, generator=g)
        x["img_cond_ids"] = make_img_ids(*cond_grid, index=1)
    return x


def _ours(model, x):
    with torch.no_grad():
        return model(
            x["img"],
            x["txt"],
            x["y"],
            T,
            x["img_ids"],
            x["txt_ids"],
            x["guidance"],
            img_cond=x.get("img_cond"),
            img_cond_ids=x.get("img_cond_ids"),
        ).float()


def _diffusers(model, x, dtype):
    img, ids = x["img"], x["img_ids"]
    if "img_cond" in x:  # what FluxKontextPipeline does: append context tokens, slice the output
        img, ids = torch.cat((img, x["img_cond"]), 1), torch.cat((ids, x["img_cond_ids"]))
    model = copy.deepcopy(model).to(dtype)  # never round the shared reference's weights
    with torch.no_grad():
        out = model(
            hidden_states=img.to(dtype),
            encoder_hidden_states=x["txt"].to(dtype),
            pooled_projections=x["y"].to(dtype),
            timestep=T,
            img_ids=ids,
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        ).sample
    return out[:, : x["img"].shape[1]].float()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [("flux-tiny-dev", None), ("flux-tiny-schnell", None), ("flux-tiny-kontext", (4, 2))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One diffusers model per architecture; the Kontext case reuses the dev weights."""
    out = {}
    for variant in ("flux-tiny-dev", "flux-tiny-schnell"):
        model = tiny_diffusers_flux(variant, seed=3)
        folder = tmp_path_factory.mktemp(variant)
        model.save_pretrained(folder)
        out[variant] = (model, folder)
    out["flux-tiny-kontext"] = out["flux-tiny-dev"]
    return out


@pytest.mark.parametrize("variant,cond_grid", CASES, ids=[c[0] for c in CASES])
def test_fp32_parity(folders, variant, cond_grid):
    ref_model, folder = folders[variant]
    ours = fastflow.load_transformer(folder, variant=variant, dtype=torch.float32)
    x = _inputs(ours.config, cond_grid=cond_grid)
    err = _rel(_ours(ours, x), _diffusers(ref_model, x, torch.float32))
    assert err <= 1e-5, f"fp32 max relative error {err:.2e}"


@pytest.mark.parametrize("variant,cond_grid", CASES, ids=[c[0] for c in CASES])
def test_bf16_error_within_twice_diffusers(folders, variant, cond_grid):
    ref_model, folder = folders[variant]
    x = _inputs(fastflow.models.from_name(variant), cond_grid=cond_grid)
    ref32 = _diffusers(ref_model, x, torch.float32)
    ref16 = _diffusers(ref_model, x, torch.bfloat16)
    ours16 = _ours(fastflow.load_transformer(folder, variant=variant, dtype=torch.bfloat16), x)
    theirs, mine = (ref16 - ref32).abs().max().item(), (ours16 - ref32).abs().max().item()
    assert theirs > 0  # the comparison would be vacuous if bf16 were exact
    assert mine <= 2 * theirs + 1e-6, f"ours {mine:.3e} vs diffusers {theirs:.3e} (bf16 - fp32 max abs)"


def test_timestep_and_guidance_are_rounded_to_bf16_before_x1000(folders):
    """bf16(0.999) = 1.0 and bf16(3.5 * 1000) = 3504: both references embed 1000 and 3504."""
    from fastflow.models.layers import timestep_embedding

    _, folder = folders["flux-tiny-dev"]
    model = fastflow.load_transformer(folder, variant="flux-tiny-dev", dtype=torch.bfloat16)
    y = torch.randn(1, model.config.vec_in_dim).bfloat16()

    def manual(t_x1000, g_x1000):  # sinusoid of fp32 values, embedding rounded to bf16 afterwards
        emb = [timestep_embedding(torch.tensor([v])).bfloat16() for v in (t_x1000, g_x1000)]
        return model.time_in(emb[0]) + model.guidance_in(emb[1]) + model.vector_in(y)

    got = model.conditioning(torch.tensor([0.999]), y, torch.tensor([3.5]))
    torch.testing.assert_close(got, manual(1000.0, 3504.0), rtol=0, atol=0)
    assert not torch.equal(got, manual(999.0, 3500.0))


def test_kontext_context_tokens_change_the_output_but_not_its_length(folders):
    _, folder = folders["flux-tiny-dev"]
    model = fastflow.load_transformer(folder, variant="flux-tiny-kontext", dtype=torch.float32)
    x = _inputs(model.config, cond_grid=(2, 3))
    plain = {k: v for k, v in x.items() if not k.startswith("img_cond")}
    with_ctx, without = _ours(model, x), _ours(model, plain)
    assert with_ctx.shape == without.shape == (B, H_TOK * W_TOK, model.config.out_channels)
    assert _rel(with_ctx, without) > 1e-3


def test_parity_check_detects_a_swapped_final_adaln(folders):
    """Negative control: the (shift, scale) order trap must show up as a large error."""
    ref_model, folder = folders["flux-tiny-dev"]
    ours = fastflow.load_transformer(folder, variant="flux-tiny-dev", dtype=torch.float32)
    w = ours.final_layer.adaLN_modulation[1]
    with torch.no_grad():
        w.weight.copy_(torch.cat(w.weight.chunk(2)[::-1]))
        w.bias.copy_(torch.cat(w.bias.chunk(2)[::-1]))
    x = _inputs(ours.config)
    assert _rel(_ours(ours, x), _diffusers(ref_model, x, torch.float32)) > 1e-2


def test_reference_backend_gives_the_same_numbers(folders):
    _, folder = folders["flux-tiny-dev"]
    model = fastflow.load_transformer(folder, variant="flux-tiny-dev", dtype=torch.float32)
    x = _inputs(model.config)
    with fastflow.ops.use_backend("reference"):
        ref = _ours(model, x)
    torch.testing.assert_close(_ours(model, x), ref, rtol=0, atol=0)
