import pytest
import torch

import fastflow

from ..conftest import tiny_pipeline_folder


@pytest.fixture(scope="session")
def pipeline_folders(tmp_path_factory):
    """Tiny diffusers-layout pipeline folders (random weights) for each family / variant."""
    root = tmp_path_factory.mktemp("pipelines")
    return {
        v: tiny_pipeline_folder(root / v, v)
        for v in (
            "flux-tiny-dev",
            "flux-tiny-schnell",
            "flux-tiny-kontext",
            "sd3.5-tiny-medium",
            "sdxl-tiny",
            "sdxl-tiny-turbo",
        )  # fmt: skip
    }


@pytest.fixture
def load(pipeline_folders):
    import torch

    def _load(variant, **kw):
        kw.setdefault("dtype", torch.float32)
        kw.setdefault("device", "cpu")
        pipe = fastflow.load(pipeline_folders[variant], **kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _load


@pytest.fixture(scope="module")
def digits():
    """The embedded digits pipeline in fp32 on the CPU, one per test module (tests change its state)."""
    from fastflow.loading import DEFAULT_MODEL

    pipe = fastflow.load(DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
