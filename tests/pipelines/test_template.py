"""The prepare -> denoise -> decode template: every transformer call carries its Step identity."""

import pytest

from fastflow.samplers import slg_active


def _record_predict(pipe):
    calls = []
    original = pipe.predict

    def predict(step, *args, **kwargs):
        calls.append((step.index, step.stage, step.branch))
        return original(step, *args, **kwargs)

    pipe.predict = predict
    return calls


def test_flux_heun_steps_and_branches(load):
    pipe = load("flux-tiny-dev")
    calls = _record_predict(pipe)
    pipe("a cat", height=16, width=16, num_inference_steps=3, sampler="heun", seed=0, output_type="latent")
    assert calls == [(0, 0, "cond"), (0, 1, "cond"), (1, 0, "cond"), (1, 1, "cond"), (2, 0, "cond")]
    calls.clear()
    pipe("a cat", height=16, width=16, num_inference_steps=2, true_cfg_scale=2.0, seed=0, output_type="latent")
    assert calls == [(0, 0, "cfg"), (1, 0, "cfg")]


def test_sd3_skip_layer_guidance_uses_the_step_index_with_heun(load):
    pipe = load("sd3.5-tiny-medium")
    calls = _record_predict(pipe)
    steps = 10
    pipe(
        "a cat",
        height=32,
        width=32,
        num_inference_steps=steps,
        sampler="heun",
        skip_guidance_layers=[1],
        seed=0,
        output_type="latent",
    )
    slg = [(i, stage) for i, stage, branch in calls if branch == "slg"]
    active = [i for i in range(steps) if slg_active(i, steps)]
    assert active == [1]
    # both evaluations of step 1 (predictor and corrector), none of step 0's corrector
    assert slg == [(1, 0), (1, 1)]
    assert [b for *_, b in calls].count("cfg") == 2 * steps - 1


@pytest.mark.parametrize("variant", ["flux-tiny-dev", "flux-tiny-schnell", "flux-tiny-kontext", "sd3.5-tiny-medium"])
def test_defaults_come_from_the_config(load, variant):
    pipe = load(variant)
    assert pipe.defaults == pipe.config.sampling.as_dict()
    assert pipe.default_size == pipe.config.sampling.size
