"""Full-size FLUX on the meta device against the official and diffusers key/shape lists.

tests/data/flux_key_shapes.json is the FLUX part of the lists generated from the official code
(shared/reference/key_shapes.json; REFERENCE.md section 5.1).
"""

import json
from pathlib import Path

import pytest
import torch

from fastflow.loading.keymaps import flux_from_diffusers
from fastflow.models import Flux, from_name

LISTS = json.loads((Path(__file__).parent.parent / "data" / "flux_key_shapes.json").read_text())
VARIANTS = ["flux-dev", "flux-schnell"]


def _meta_shapes(name):
    with torch.device("meta"):
        model = Flux(from_name(name))
    return {k: list(v.shape) for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize("variant", VARIANTS)
def test_names_and_shapes_equal_the_official_list(variant):
    ours, _ = _meta_shapes(variant)
    official = LISTS[f"{variant}_official"]
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}


@pytest.mark.parametrize("variant,billions", [("flux-dev", 11.901), ("flux-schnell", 11.891)])
def test_parameter_count(variant, billions):
    _, model = _meta_shapes(variant)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == billions


def test_kontext_has_the_dev_tensors():
    assert _meta_shapes("flux-kontext-dev")[0] == _meta_shapes("flux-dev")[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_list_maps_onto_ours_exactly(variant):
    ours, _ = _meta_shapes(variant)
    diffusers = LISTS[f"{variant}_diffusers"]
    used = []
    for key, shape in ours.items():
        segments = flux_from_diffusers(key)
        missing = [s.key for s in segments if s.key not in diffusers]
        assert missing == [], f"{key}: sources {missing} not in the diffusers list"
        rows = sum(diffusers[s.key][0] // (2 if s.half is not None else 1) for s in segments)
        assert [rows, *diffusers[segments[0].key][1:]] == shape, key
        used += [s.key for s in segments]
    assert len(set(used)) == len(diffusers) and set(used) == set(diffusers)  # nothing left over
