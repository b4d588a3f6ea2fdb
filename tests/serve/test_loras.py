"""LoRAs over the API: registered names and relative paths under --lora-dir, switched per request
by unfused scales; a served image equals the in-process one with the same LoRA and scale, and no
request path reaches outside the LoRA folder (absolute, '..', symlinks out, other suffixes)."""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from .conftest import MODEL, httpx, png_pixels, serving

GEN = "/v1/images/generations"


def write_lora(pipe, path, seed: int, block: str = "double_blocks.0.") -> None:
    """A random rank-2 LoRA (official layer names) on the linear layers of one block."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(block):
            state[f"{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.3
    save_file(state, str(path))


@pytest.fixture
def lora_files(tmp_path, pipe):
    outside = tmp_path / "outside.safetensors"
    write_lora(pipe, outside, 1)
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    write_lora(pipe, folder / "sub" / "detail.safetensors", 2, "single_blocks.0.")
    (folder / "link.safetensors").symlink_to(outside)
    (folder / "notes.txt").write_text("not a LoRA")
    save_file({"nothing.here.lora_A.weight": torch.zeros(2, 4), "nothing.here.lora_B.weight": torch.zeros(4, 2)},
              str(folder / "broken.safetensors"))  # fmt: skip
    return outside, folder


def in_process(prompt, seed, loras):
    """A fresh pipeline with ``loras`` ({path: scale}) loaded: the reference image (uint8)."""
    import fastflow

    pipe = fastflow.load(MODEL)
    for path, scale in loras.items():
        pipe.load_lora(str(path), scale=scale)
    return np.asarray(pipe(prompt, seed=seed, progress=False).images[0])


def test_lora_by_name_and_path_equal_in_process(lora_files):
    import fastflow

    outside, folder = lora_files
    served = fastflow.load(MODEL)  # its own: LoRAs are loaded into it
    detail = folder / "sub" / "detail.safetensors"
    asks = [
        ({"prompt": "a 3", "seed": 21, "loras": [{"name": "style", "scale": 0.7}]}, {outside: 0.7}),
        ({"prompt": "a 3", "seed": 21}, {}),
        ({"prompt": "a 3", "seed": 21, "loras": [{"path": "sub/detail.safetensors"}]}, {detail: 1.0}),
        ({"prompt": "a 5", "seed": 22, "loras": [{"name": "style", "scale": -0.5},
                                                 {"path": "sub/detail.safetensors", "scale": 0.4}]},
         {outside: -0.5, detail: 0.4}),
    ]  # fmt: skip
    with serving(served, loras={"style": str(outside)}, lora_dir=str(folder), batch_window_ms=300) as (base, _):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda a: httpx.post(base + GEN, json=a[0], timeout=120), asks))
        models = httpx.get(base + "/v1/models").json()
    assert models["data"][0]["loras"] == ["style"]
    images = []
    for (ask, loras), r in zip(asks, answers, strict=True):
        assert r.status_code == 200, r.text
        image = png_pixels(r.json()["data"][0]["b64_json"])
        assert np.array_equal(image, in_process(ask["prompt"], ask["seed"], loras)), ask
        images.append(image)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    settings = answers[3].json()["settings"]["loras"]
    assert settings == [{"name": "dir:sub/detail.safetensors", "scale": 0.4}, {"name": "style", "scale": -0.5}]


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("/etc/passwd", 400, "lora_path_refused"),
        ("../outside.safetensors", 400, "lora_path_refused"),
        ("sub/../../outside.safetensors", 400, "lora_path_refused"),
        ("link.safetensors", 400, "lora_path_refused"),  # a symlink out of the folder
        ("notes.txt", 400, "lora_path_refused"),
        ("sub//detail.safetensors", 400, "lora_path_refused"),
        ("~/x.safetensors", 400, "lora_path_refused"),
        ("sub\\detail.safetensors", 400, "lora_path_refused"),
        ("missing.safetensors", 404, "lora_not_found"),
        ("broken.safetensors", 422, "unprocessable"),  # a file the model cannot take: refused when loaded
    ],
)
def test_lora_paths_refused(lora_files, pipe, path, status, code):
    _, folder = lora_files
    with serving(pipe, lora_dir=str(folder)) as (base, _):
        r = httpx.post(base + GEN, json={"prompt": "a 1", "loras": [{"path": path}]}, timeout=60)
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code
        assert httpx.post(base + GEN, json={"prompt": "a 1", "seed": 3}, timeout=60).status_code == 200
    assert not pipe.loras  # nothing stayed loaded on the shared pipeline


def test_registered_lora_must_exist(tmp_path):
    from fastflow.errors import InputError
    from fastflow.serve import ServeConfig

    with pytest.raises(InputError, match="not a file"):
        ServeConfig(model=MODEL, loras={"x": str(tmp_path / "none.safetensors")})
    with pytest.raises(InputError, match="not a folder"):
        ServeConfig(model=MODEL, lora_dir=os.fspath(tmp_path / "none"))
