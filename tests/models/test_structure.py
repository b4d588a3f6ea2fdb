"""The transformers' embed / blocks / final split, batched position ids, skip_layers=None."""

import pytest
import torch

from fastflow.errors import InputError
from fastflow.models import Flux, MMDiT, from_name
from fastflow.models.flux import make_img_ids

from ..conftest import perturbed


def _flux_inputs(b=2):
    g = torch.Generator().manual_seed(1)
    return dict(
        img=torch.randn(b, 6, 64, generator=g),
        txt=torch.randn(b, 3, 48, generator=g),
        y=torch.randn(b, 32, generator=g),
        timesteps=torch.tensor([0.5, 0.25])[:b],
        img_ids=make_img_ids(2, 3),
        guidance=torch.tensor([3.5, 2.0])[:b],
    )


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    return perturbed(Flux(from_name("flux-tiny-dev")).eval())


@torch.no_grad()
def test_flux_split_equals_forward_and_runs_in_pieces(flux):
    inputs = _flux_inputs()
    expected = flux(**inputs)
    state = flux.embed(**inputs)
    assert flux.num_blocks == 4
    flux.blocks(state, 0, 1)  # a caching policy runs the first block, decides, then the rest
    flux.blocks(state, 1)
    torch.testing.assert_close(flux.final(state), expected, rtol=0, atol=0)


@torch.no_grad()
def test_flux_takes_batched_ids(flux):
    inputs = _flux_inputs()
    expected = flux(**inputs)
    batched = dict(inputs, img_ids=inputs["img_ids"].expand(2, -1, -1), txt_ids=torch.zeros(2, 3, 3))
    torch.testing.assert_close(flux(**batched), expected, rtol=0, atol=0)
    differ = batched["img_ids"].clone()
    differ[1, 0, 1] = 7
    with pytest.raises(InputError, match="differ between samples"):
        flux(**dict(inputs, img_ids=differ))
    with pytest.raises(InputError, match="position ids do not match"):
        flux(**dict(inputs, img_ids=make_img_ids(3, 3)))


@torch.no_grad()
def test_every_block_attends_through_one_method(flux):
    calls = []
    for block in [*flux.double_blocks, *flux.single_blocks]:
        original = block.attention

        def wrapped(q, k, v, _original=original):
            calls.append(q.shape)
            return _original(q, k, v)

        block.attention = wrapped
    try:
        flux(**_flux_inputs())
    finally:
        for block in [*flux.double_blocks, *flux.single_blocks]:
            del block.attention
    assert len(calls) == 4 and all(shape[2] == 9 for shape in calls)  # 3 text + 6 image tokens


@torch.no_grad()
def test_mmdit_split_and_skip_layers_none():
    torch.manual_seed(0)
    model = perturbed(MMDiT(from_name("sd3.5-tiny-medium")).eval())
    g = torch.Generator().manual_seed(1)
    x, ctx, y = (
        torch.randn(1, 16, 8, 6, generator=g),
        torch.randn(1, 5, 48, generator=g),
        torch.randn(1, 32, generator=g),
    )
    t = torch.tensor([600.0])
    expected = model(x, t, ctx, y)
    torch.testing.assert_close(model(x, t, ctx, y, skip_layers=None), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.final(model.blocks(model.embed(x, t, ctx, y))), expected, rtol=0, atol=0)
    skipped = model(x, t, ctx, y, skip_layers=[0])
    state = model.blocks(model.embed(x, t, ctx, y), skip_layers=[0])
    torch.testing.assert_close(model.final(state), skipped, rtol=0, atol=0)
    assert (skipped - expected).abs().max() > 0


def test_rope_tables_are_reused_only_for_equal_ids():
    """EmbedND hands back the previous call's tables when the ids are equal (every step of a
    generation asks again) and recomputes them for any other ids, including a same-shape edit."""
    from fastflow.models.flux import EmbedND, make_img_ids

    embed = EmbedND(32, 10000, (8, 12, 12))
    ids = make_img_ids(3, 5)
    first = embed(ids)
    assert embed(ids.clone())[0] is first[0]  # equal ids: the same tables
    moved = ids.clone()
    moved[4, 2] += 7
    again = embed(moved)
    assert again[0] is not first[0]
    for got, fresh in zip(again, embed.tables(moved), strict=True):
        assert torch.equal(got, fresh)
    assert not torch.equal(again[0], first[0])
