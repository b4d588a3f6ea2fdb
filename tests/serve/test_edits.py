"""POST /v1/images/edits (multipart): image-to-image and inpainting on the tiny FLUX model equal
the in-process calls for the same seed; what a model cannot do is refused with a 400."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest

from .conftest import httpx, png_pixels, serving

EDITS = "/v1/images/edits"


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def inputs(pipe):
    from PIL import Image

    image = pipe("a 8", seed=40, progress=False).images[0]
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, image.width // 2, image.height))  # repaint the left half
    return image, mask


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe) as (base, app):
        yield base, app


def test_image_to_image_equals_in_process(server, pipe, inputs):
    base, _ = server
    image, _ = inputs
    form = {"prompt": "a 2", "seed": "9", "strength": "0.5", "n": "2"}
    r = httpx.post(base + EDITS, data=form, files={"image": ("in.png", png(image), "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["settings"]["strength"] == 0.5 and body["settings"]["size"] == "16x16"
    out = pipe(["a 2", "a 2"], image=image, strength=0.5, seed=[9, 10], height=16, width=16, progress=False)
    for d, expected in zip(body["data"], out.images, strict=True):
        assert np.array_equal(png_pixels(d["b64_json"]), np.asarray(expected))


def test_inpainting_equals_in_process(server, pipe, inputs):
    base, _ = server
    image, mask = inputs
    files = {"image": ("in.png", png(image), "image/png"), "mask": ("mask.png", png(mask), "image/png")}
    r = httpx.post(base + EDITS, data={"prompt": "a 1", "seed": "5"}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["settings"]["strength"] == 0.6  # the pipeline's default, reported
    expected = pipe("a 1", image=image, mask_image=mask, strength=0.6, seed=5, height=16, width=16, progress=False)
    assert np.array_equal(png_pixels(r.json()["data"][0]["b64_json"]), np.asarray(expected.images[0]))


def test_stream_edit_counts_the_steps_it_runs(server, inputs):
    base, _ = server
    files = {"image": ("in.png", png(inputs[0]), "image/png")}
    form = {"prompt": "a 2", "seed": "1", "strength": "0.5", "num_inference_steps": "8", "stream": "true"}
    with httpx.stream("POST", base + EDITS, data=form, files=files, timeout=60) as r:
        text = "".join(r.iter_text())
    assert text.count("event: progress") == 4 and '"steps":4' in text and "event: completed" in text


@pytest.mark.parametrize(
    "form,files,code",
    [
        ({"prompt": "a 1"}, {}, "invalid_form"),  # not multipart
        ({"prompt": "a 1"}, "mask-only", "missing_field"),
        ({"prompt": "a 1"}, {"image": ("x.png", b"not an image", "image/png")}, "invalid_image"),
        ({"prompt": "a 1", "strength": "0"}, None, "invalid_value"),
        ({"prompt": "a 1", "strength": "1.5"}, None, "invalid_value"),
        ({"prompt": "a 1", "strength": "nan"}, None, "invalid_value"),
        ({"prompt": "a 1", "seed": "x"}, None, "invalid_value"),
        ({"prompt": "a 1", "stream": "maybe"}, None, "invalid_value"),
        ({"prompt": "a 1", "colour": "red"}, None, "unknown_field"),
        ({"prompt": "a 1", "image": "a path"}, "mask-only", "invalid_image"),
        ({"prompt": "a 1", "image": "a path"}, None, "invalid_value"),  # given twice
        ({"prompt": "a 1", "loras": "[{"}, None, "invalid_value"),
        ({"prompt": "a 1"}, "mask-size", "invalid_value"),
        ({"prompt": "a 1"}, "extra-file", "unknown_field"),
        ({"prompt": ""}, None, "missing_field"),
    ],
)
def test_bad_edits(server, inputs, form, files, code):
    base, _ = server
    image = ("in.png", png(inputs[0]), "image/png")
    if files is None:
        files = {"image": image}
    elif files == "mask-size":
        from PIL import Image

        files = {"image": image, "mask": ("m.png", png(Image.new("L", (8, 8), 255)), "image/png")}
    elif files == "mask-only":
        files = {"mask": ("m.png", png(inputs[1]), "image/png")}
    elif files == "extra-file":
        files = {"image": image, "other": image}
    r = httpx.post(base + EDITS, data=form, files=files, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code


def test_edits_the_model_cannot_do(server, inputs):
    """A model without image-to-image / inpainting, and a Kontext model's rules (no mask, no strength)."""
    base, app = server
    state = app.state.server
    info = state.info
    image = ("in.png", png(inputs[0]), "image/png")
    mask = ("m.png", png(inputs[1]), "image/png")
    try:
        state.info = dataclasses.replace(info, inpaint=False)
        r = httpx.post(base + EDITS, data={"prompt": "a 1"}, files={"image": image, "mask": mask}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "inpainting_unsupported"
        state.info = dataclasses.replace(info, inpaint=False, img2img=False)
        r = httpx.post(base + EDITS, data={"prompt": "a 1"}, files={"image": image}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "edits_unsupported"
        state.info = dataclasses.replace(info, inpaint=False, img2img=False, fill=True)  # FLUX.1 Fill: a mask
        r = httpx.post(base + EDITS, data={"prompt": "a 1"}, files={"image": image}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field"
        state.info = dataclasses.replace(info, inpaint=False, img2img=False, kontext=True)
        r = httpx.post(base + EDITS, data={"prompt": "a 1", "strength": "0.5"}, files={"image": image}, timeout=60)
        assert r.status_code == 400 and "strength" in r.json()["error"]["message"]
    finally:
        state.info = info
