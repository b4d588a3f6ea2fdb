"""Full-size MMDiT on the meta device against the official and diffusers key/shape lists
(tests/data/sd3_key_shapes.json, from shared/reference/key_shapes.json; REFERENCE.md 5.2)."""

import json
from pathlib import Path

import pytest
import torch

from fastflow.loading.keymaps import sd3_from_diffusers
from fastflow.models import MMDiT, from_name

LISTS = json.loads((Path(__file__).parent.parent / "data" / "sd3_key_shapes.json").read_text())
PREFIX = "model.diffusion_model."
VARIANTS = ["sd3-medium", "sd3.5-large", "sd3.5-medium"]


def _meta(name):
    with torch.device("meta"):
        model = MMDiT(from_name(name))
    return {k: list(v.shape) for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_names_and_shapes_equal_the_official_list(variant):
    ours, _ = _meta(variant)
    official = {k.removeprefix(PREFIX): v for k, v in LISTS[f"{variant}_official"].items()}
    assert sorted(set(official) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


@pytest.mark.parametrize("variant,billions", [("sd3-medium", 2.028), ("sd3.5-large", 8.057), ("sd3.5-medium", 2.243)])
def test_parameter_count_without_pos_embed(variant, billions):
    _, model = _meta(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions


def test_turbo_has_the_large_tensors():
    assert _meta("sd3.5-large-turbo")[0] == _meta("sd3.5-large")[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_list_maps_onto_ours_exactly(variant):
    ours, model = _meta(variant)
    diffusers = LISTS[f"{variant}_diffusers"]
    used = set()
    for key, shape in ours.items():
        segments = sd3_from_diffusers(key, model.config)
        assert [s.key for s in segments if s.key not in diffusers] == [], key
        rows = sum(diffusers[s.key][0] // (2 if s.half is not None else 1) for s in segments)
        assert [rows, *diffusers[segments[0].key][1:]] == shape, key
        used |= {s.key for s in segments}
    assert used == set(diffusers)
