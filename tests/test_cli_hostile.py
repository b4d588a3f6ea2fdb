"""Issue 31, CLI: hostile or unusual input is a typed one-line error (exit 2), never a crash, a hang
or a terminal escape sequence; valid input the CLI used to refuse is accepted."""

import json
import os
import warnings
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fastflow.cli import build_parser, main
from fastflow.loading.source import DEFAULT_MODEL

FAST = ["--steps", "1", "--no-progress", "--device", "cpu"]
SETTINGS = {"height": 16, "width": 16, "num_inference_steps": 1, "model": "fastflow-tiny-digits"}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_exit_2(code, err, *needles):
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def _png(path, **text):
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    Image.new("RGB", (16, 16)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("what", ["--from", "--image", "--config", "--model", "--vae"])
def test_a_fifo_is_refused_by_type_not_read(capsys, tmp_path, what):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    argv = ["generate", "a seven", *FAST, "-o", tmp_path / "o.png", what, fifo]
    code, _, err = _run(capsys, *argv)  # before: --from blocked forever in open()
    _one_line_exit_2(code, err)
    assert "FIFO" in err or "regular file" in err, err


@pytest.mark.parametrize(
    "text,needle",
    [
        ({"prompt": "x", "settings": json.dumps({"height": "sixteen"})}, "setting height"),
        ({"prompt": "x", "settings": json.dumps({"num_inference_steps": 10**12})}, "num_inference_steps"),
        ({"prompt": "x", "settings": json.dumps({"guidance_scale": [1]})}, "guidance_scale"),
        ({"prompt": "x", "settings": json.dumps({"upscale": True})}, "upscale"),
        ({"prompt": "x", "settings": '{"guidance_scale": NaN}'}, "not valid JSON"),
        ({"prompt": "x", "settings": "[1, 2]"}, "not a JSON object"),
        ({"prompt": "x", "seed": "minus one", "settings": "{}"}, "seed"),
        ({"prompt": "x", "seed": "-5", "settings": "{}"}, "seed"),
        ({"prompt": "x", "settings": json.dumps({"sampler": "rm -rf"})}, "sampler"),
    ],
)
def test_from_validates_every_field(capsys, tmp_path, text, needle):
    image = _png(tmp_path / "bad.png", **text)
    code, _, err = _run(capsys, "generate", *FAST, "--from", image, "-o", tmp_path / "o.png")
    _one_line_exit_2(code, err, needle)  # before: ValueError / TypeError tracebacks or silent garbage


def test_from_a_ztxt_bomb_is_typed(capsys, tmp_path):
    info = PngInfo()
    info.add_text("prompt", "x")
    info.add_text("settings", "{" + " " * (64 << 20) + "}", zip=True)  # 64 MB of JSON in a few KB
    path = tmp_path / "bomb.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert path.stat().st_size < 1 << 20
    code, _, err = _run(capsys, "generate", *FAST, "--from", path, "-o", tmp_path / "o.png")
    _one_line_exit_2(code, err, "--from")


def test_from_a_huge_header_is_refused_without_decoding(capsys, tmp_path):
    """A 100000 x 100000 PNG header: a decompression bomb error, not a crash or 30 GB of pixels."""
    path = tmp_path / "huge.png"
    Image.new("RGB", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    code, _, err = _run(capsys, "generate", *FAST, "--from", path, "-o", tmp_path / "o.png")
    _one_line_exit_2(code, err, "decompression bomb")


def test_from_prints_the_model_field_safely(capsys, tmp_path):
    settings = dict(SETTINGS, model="\x1b]0;pwned\x07\x1b[2J evil", model_path="\x1b[31mred")
    image = _png(tmp_path / "esc.png", prompt="x", seed="1", settings=json.dumps(settings))
    code, _, err = _run(capsys, "generate", *FAST, "--from", image, "-o", tmp_path / "o.png")
    _one_line_exit_2(code, err, "pass --model")
    assert "\x1b" not in err and "\x07" not in err and "\\x1b" in err, repr(err)


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_from_reads_the_jpeg_and_webp_fastflow_wrote(capsys, tmp_path, suffix):
    first = tmp_path / f"first{suffix}"
    code, _, err = _run(capsys, "generate", "a handwritten 3", *FAST, "--seed", "5", "-H", "16", "-o", first)
    assert code == 0, err
    again = tmp_path / f"again{suffix}"
    code, out, err = _run(capsys, "generate", "--from", first, "--no-progress", "--device", "cpu", "-o", again)
    assert code == 0 and "seed 5" in out, err  # before: "not an image fastflow wrote"


def test_config_values_are_checked(capsys, tmp_path):
    model = ["--model", DEFAULT_MODEL, "-o", tmp_path / "o.png"]
    cases = [
        ('{"num_heads": 0}', "num_heads"),
        ('{"depth": Infinity}', "non-finite"),
        ('{"hidden_size": 1e300}', "hidden_size"),
        ('{"name": "caf\u00e9"}', "ASCII"),
        ('{"axes_dim": [' + ",".join(["1"] * 5000) + "]}", "axes_dim"),
        ("{" + " " * 70000 + "}", "limit"),
    ]
    for config, needle in cases:
        code, _, err = _run(capsys, "generate", "a seven", *FAST, *model, "--config", config)
        _one_line_exit_2(code, err, "--config", needle)
    latin1 = tmp_path / "c.json"
    latin1.write_bytes(b'{"name": "caf\xe9"}')
    code, _, err = _run(capsys, "generate", "a seven", *FAST, *model, "--config", latin1)
    _one_line_exit_2(code, err, "UTF-8")


def test_a_name_too_long_for_the_filesystem_is_typed(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "a seven", *FAST, "-o", tmp_path / ("x" * 300 + ".png"))
    _one_line_exit_2(code, err, "shorter name")  # before: an OSError traceback (File name too long)


def test_dot_png_is_a_file_name(capsys, tmp_path):
    code, out, err = _run(capsys, "generate", "a seven", *FAST, "-o", tmp_path / ".png")
    assert code == 0 and (tmp_path / ".png").is_file(), err


def test_several_prompts_each_make_their_images(capsys, tmp_path):
    out_png = tmp_path / "p.png"
    code, out, err = _run(capsys, "generate", "-p", "a one", "a two", "-p", "a three", *FAST, "-o", out_png)
    assert code == 0, err
    prompts = []
    for f in sorted(tmp_path.iterdir()):
        with Image.open(f) as im:
            prompts.append(im.text["prompt"])
    assert sorted(prompts) == ["a one", "a three", "a two"]  # before: "a two" was dropped silently


def test_the_size_message_names_the_real_limit(capsys, tmp_path):
    code, _, err = _run(capsys, "generate", "a seven", *FAST, "-H", "4096", "-W", "4096", "-o", tmp_path / "o.png")
    _one_line_exit_2(code, err, "-H")
    assert "--upscale" not in err, err  # before: "--upscale 4 would save 16384 px images"


def test_info_takes_an_embedded_name(capsys):
    code, out, err = _run(capsys, "info", "fastflow-tiny-digits")
    assert code == 0 and "fastflow-tiny-digits" in out, err


def test_every_command_takes_debug():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        assert "--debug" in p._option_string_actions, name


def test_tuning_without_scikit_learn_says_what_to_install(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "sklearn" else real(n, *a))
    for command in ("tune-steps", "tune-cache"):
        code, _, err = _run(capsys, command, "--device", "cpu")
        _one_line_exit_2(code, err, "pip install scikit-learn scipy")


def test_warnings_print_one_line(capsys, monkeypatch):
    from fastflow.cli import generate

    def warn_and_fail(args):
        warnings.warn("something odd", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(generate, "run", warn_and_fail)
    code, _, err = _run(capsys, "generate", "x")
    assert code == 0 and err == "fastflow: warning: something odd\n", repr(err)


def test_single_files_from_the_command_line(capsys, tmp_path):
    """A single transformer file with its VAE file and text-encoder folders (+ tokenizer folders)."""
    import shutil

    flux, vae = tmp_path / "flux.safetensors", tmp_path / "vae.safetensors"
    shutil.copy(DEFAULT_MODEL / "transformer" / "diffusion_pytorch_model.safetensors", flux)
    shutil.copy(DEFAULT_MODEL / "vae" / "diffusion_pytorch_model.safetensors", vae)
    parts = [
        "--vae",
        vae,
        "--clip-l",
        DEFAULT_MODEL / "text_encoder",
        "--clip-l-tokenizer",
        DEFAULT_MODEL / "tokenizer",
    ]
    parts += ["--t5", DEFAULT_MODEL / "text_encoder_2", "--t5-tokenizer", DEFAULT_MODEL / "tokenizer_2"]
    code, out, err = _run(capsys, "generate", "a seven", *FAST, "--model", flux, *parts, "-o", tmp_path / "o.png")
    assert code == 0 and (tmp_path / "o.png").is_file(), err
    code, _, err = _run(capsys, "generate", "a seven", *FAST, "--model", flux, "--t5", vae, "-o", tmp_path / "p.png")
    _one_line_exit_2(code, err, "--t5-tokenizer")
