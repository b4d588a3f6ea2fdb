"""The velocity function receives a Step: which solver step and stage each evaluation belongs to."""

import pytest
import torch

from fastflow.samplers import Step, dpmpp_2m, euler, heun

SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def _record(solver):
    seen = []

    def velocity(x, step):
        seen.append((step.index, step.stage, float(step), step.sigma_next, step.steps))
        return x

    solver(velocity, torch.ones(2), SIGMAS)
    return seen


def test_euler_and_dpmpp_evaluate_once_per_step():
    expected = [
        (i, 0, s, n, 4) for i, (s, n) in enumerate(zip([1.0, 0.75, 0.5, 0.25], [0.75, 0.5, 0.25, 0.0], strict=True))
    ]
    assert _record(euler) == expected
    assert _record(dpmpp_2m) == expected


def test_heun_corrector_keeps_its_step_index():
    seen = _record(heun)
    # predictor at sigma_i (stage 0), corrector at sigma_{i+1} with the same index (stage 1);
    # no corrector into sigma = 0
    assert seen == [
        (0, 0, 1.0, 0.75, 4),
        (0, 1, 0.75, 0.75, 4),
        (1, 0, 0.75, 0.5, 4),
        (1, 1, 0.5, 0.5, 4),
        (2, 0, 0.5, 0.25, 4),
        (2, 1, 0.25, 0.25, 4),
        (3, 0, 0.25, 0.0, 4),
    ]


def test_a_step_is_its_sigma():
    step = Step(0.5, 3, 0.25, 10)
    assert step == 0.5 and step * 1000 == 500.0 and step.sigma == 0.5
    assert torch.full((2,), step).tolist() == [0.5, 0.5]
    cond = step.with_branch("cfg")
    assert cond.branch == "cfg" and cond.index == 3 and step.branch is None
    assert "index=3" in repr(cond)
    with pytest.raises(AttributeError):
        step.other = 1  # slots: no stray attributes
