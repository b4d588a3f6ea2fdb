"""fastflow generate as a user of other tools expects it: bad values exit 2 with one line before
any work, -o picks the format from its suffix (or a folder), metadata other tools read and no
absolute paths, --true-cfg, --from IMAGE re-runs an image's settings."""

import json

import numpy as np
import pytest
from PIL import Image

from fastflow.cli import main

FAST = ["--steps", "2", "--no-progress", "--device", "cpu"]


def _run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-n", "0"], "-n must be from 1"),
        (["-H", "0"], "-H must be a positive integer"),
        (["-W", "-16"], "-W must be a positive integer"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--upscale", "0"], "--upscale must be from 1"),
        (["-o", "out.gif"], "out.gif is a video, but fastflow-tiny-digits is an image model"),
        (["-o", "no-suffix"], "name an image file ending in .png"),
        (["--config", "[1, 2]"], "--config must be a JSON object"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--strength", "1.5"], "--strength must be in (0, 1]"),
    ],
)
def test_bad_values_exit_2_with_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "a seven", *FAST, *argv)  # the case last: it wins over FAST
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("suffix,magic", [(".jpg", b"\xff\xd8"), (".jpeg", b"\xff\xd8"), (".webp", b"RIFF")])
def test_the_suffix_picks_the_format(capsys, tmp_path, suffix, magic):
    target = tmp_path / f"out{suffix}"
    code, out, err = _run(capsys, "a seven", "-o", str(target), "--seed", "1", *FAST)
    assert code == 0, err
    assert target.read_bytes()[: len(magic)] == magic
    if suffix != ".webp":
        with Image.open(target) as im:
            assert b"Seed: 1" in im.info.get("comment", b"")


def test_a_folder_as_output_gets_numbered_files(capsys, tmp_path):
    for _ in range(2):
        assert _run(capsys, "a seven", "-o", str(tmp_path), *FAST)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastflow-1.png", "fastflow.png"]


def test_png_metadata_for_other_tools_and_no_absolute_paths(capsys, tmp_path):
    target = tmp_path / "a.png"
    code, _, err = _run(capsys, "a seven", "-o", str(target), "--seed", "4", "--true-cfg", "2.0",
                        "--negative-prompt", "a three", *FAST)  # fmt: skip
    assert code == 0, err
    with Image.open(target) as im:
        text = dict(im.text)
    settings = json.loads(text["settings"])
    assert settings["negative_prompt"] == "a three" and settings["true_cfg_scale"] == 2.0
    assert not any(str(v).startswith("/") for v in settings.values()), settings
    lines = text["parameters"].splitlines()
    assert lines[0] == "a seven" and lines[1] == "Negative prompt: a three"
    assert "Steps: 2" in lines[2] and "Seed: 4" in lines[2] and "Model: fastflow-tiny-digits" in lines[2]


def test_from_an_image_reruns_its_settings(capsys, tmp_path):
    first = tmp_path / "first.png"
    assert _run(capsys, "a handwritten four", "-o", str(first), "--seed", "9", "-H", "16", "-W", "32", *FAST)[0] == 0
    again = tmp_path / "again.png"
    code, out, err = _run(capsys, "--from", str(first), "-o", str(again), "--no-progress", "--device", "cpu")
    assert code == 0, err
    with Image.open(first) as a, Image.open(again) as b:
        assert a.size == b.size  # the model's viewing upscale applies to both
        assert json.loads(b.text["settings"])["height"] == 16 and json.loads(b.text["settings"])["width"] == 32
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.text["prompt"] == b.text["prompt"] and b.text["seed"] == "9"
    code, _, err = _run(capsys, "--from", str(tmp_path / "nothing.png"), *FAST)
    assert code == 2 and "cannot read it as an image" in err


def test_sizes_beyond_the_trained_range_warn_in_one_line(capsys, tmp_path):
    code, out, err = _run(capsys, "a seven", "-H", "48", "-W", "48", "--upscale", "1", "-o", str(tmp_path / "w.png"),
                          *FAST)  # fmt: skip
    assert code == 0 and err.strip().splitlines() == [
        "fastflow: warning: 48 px is beyond fastflow-tiny-digits's trained size (16 px): expect poor images and a "
        "long run"
    ]
    code, _, err = _run(capsys, "a seven", "-H", "80", "-o", str(tmp_path / "x.png"), *FAST)  # > 4x: refused
    assert code == 2 and "limit" in err


def test_info_on_a_folder_lists_every_component_in_human_units(capsys):
    from fastflow.loading import DEFAULT_MODEL
    from fastflow.loading.loader import human_bytes

    assert main(["info", str(DEFAULT_MODEL)]) == 0
    out = capsys.readouterr().out
    assert "size:        2.0 MiB in 1 file(s)" in out and "0.00 GiB" not in out
    for part in ("transformer/", "vae/", "text_encoder/", "text_encoder_2/"):
        assert part in out.split("components:")[1]
    assert [human_bytes(n) for n in (5, 1536, 3 * 2**20, 150 * 2**30)] == ["5 B", "1.5 KiB", "3.0 MiB", "150 GiB"]


def test_cpu_threads_follow_the_model_size_and_can_be_set(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
    seen = []
    assert _run(capsys, "a seven", "-o", str(tmp_path / "a.png"), *FAST)[0] == 0
    assert seen == [1]  # the embedded model: 1 M parameters, one thread
    monkeypatch.setenv("FASTFLOW_NUM_THREADS", "3")
    assert _run(capsys, "a seven", "-o", str(tmp_path / "b.png"), *FAST)[0] == 0
    assert _run(capsys, "a seven", "-o", str(tmp_path / "c.png"), "--threads", "2", *FAST)[0] == 0
    assert seen == [1, 3, 2]  # the variable, then the flag over it
    code, _, err = _run(capsys, "a seven", "-o", str(tmp_path / "d.png"), "--threads", "zero", *FAST)
    assert code == 2 and "--threads must be a thread count" in err
    monkeypatch.setenv("FASTFLOW_NUM_THREADS", "-1")
    code, _, err = _run(capsys, "a seven", "-o", str(tmp_path / "e.png"), *FAST)
    assert code == 2 and "FASTFLOW_NUM_THREADS must be" in err and seen == [1, 3, 2]


def test_cpu_threads_for_a_large_model_are_torchs_default():
    import types

    import torch

    from fastflow.cli.common import cpu_threads

    big = types.SimpleNamespace(transformer=torch.nn.Linear(8000, 8000))  # 64 M parameters
    assert cpu_threads(big) == torch.get_num_threads()


def test_image_to_image(capsys, tmp_path):
    """--image on a text-to-image model: image-to-image from --strength (stored in the PNG)."""
    src = tmp_path / "src.png"
    assert _run(capsys, "a handwritten seven", "-o", str(src), "--seed", "1", *FAST)[0] == 0
    code, out, err = _run(capsys, "a handwritten three", "-o", str(tmp_path / "b.png"), "--image", str(src),
                          "--strength", "0.5", "--seed", "2", *FAST)  # fmt: skip
    assert code == 0, err
    with Image.open(tmp_path / "b.png") as im:
        settings = json.loads(im.text["settings"])
    assert settings["strength"] == 0.5 and settings["edit"] is True
