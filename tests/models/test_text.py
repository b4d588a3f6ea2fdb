"""Text encoders against a direct transformers computation, on tiny random encoders with
tokenizer files written by the test (word-level, CLIP-style and T5-style special tokens)."""

import pytest
import torch

from fastflow import errors
from fastflow.models.text import CLIPEncoder, FluxTextEncoder, SD3TextEncoder, T5Encoder

from ..conftest import clip_tokenizer, t5_tokenizer, tiny_clip, tiny_t5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    parts = {
        "clip_l": (tiny_clip(16, False, 1), clip_tokenizer(False)),
        "clip_l_proj": (tiny_clip(16, True, 1), clip_tokenizer(False)),
        "clip_g": (tiny_clip(24, True, 2), clip_tokenizer(True)),
        "t5": (tiny_t5(48, 3), t5_tokenizer()),
    }
    for name, (model, tok) in parts.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, {k: v[0] for k, v in parts.items()}


PROMPTS = ["a handwritten seven", "the digit 3 on a mat"]


def test_flux_outputs_equal_transformers(folders):
    root, ref = folders
    clip = CLIPEncoder.from_folder(root / "clip_l")
    t5 = T5Encoder.from_folder(root / "t5", dtype=torch.float32)
    txt, y = FluxTextEncoder(clip, t5, max_length=12)(PROMPTS)
    ids_l = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_t = t5.tokenizer(PROMPTS, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(y, ref["clip_l"](ids_l).pooler_output, rtol=0, atol=0)
        torch.testing.assert_close(txt, ref["t5"](ids_t).last_hidden_state, rtol=0, atol=0)
    assert txt.shape == (2, 12, 48) and y.shape == (2, 16)
    assert ids_t[0].tolist() == [3, 4, 5, 1] + [0] * 8  # T5: EOS then <pad>, no mask anywhere
    assert ids_l[0, :5].tolist() == [1, 4, 5, 6, 2] and set(ids_l[0, 5:].tolist()) == {2}  # CLIP-L pads with EOS


def test_sd3_assembly(folders):
    root, ref = folders
    clip_l = CLIPEncoder.from_folder(root / "clip_l_proj", with_projection=True)
    clip_g = CLIPEncoder.from_folder(root / "clip_g", with_projection=True)
    t5 = T5Encoder.from_folder(root / "t5", dtype=torch.float32)
    context, pooled = SD3TextEncoder(clip_l, clip_g, t5, t5_max_length=20)(PROMPTS)
    assert context.shape == (2, 77 + 20, 48) and pooled.shape == (2, 24 + 32)

    ids_g = clip_g.tokenize(PROMPTS)
    assert ids_g[0, :5].tolist() == [1, 4, 5, 6, 2] and set(ids_g[0, 5:].tolist()) == {0}  # CLIP-G pads with 0
    with torch.no_grad():
        out_l = ref["clip_l_proj"](clip_l.tokenize(PROMPTS), output_hidden_states=True)
        out_g = ref["clip_g"](ids_g, output_hidden_states=True)
    torch.testing.assert_close(context[:, :77, :16], out_l.hidden_states[-2], rtol=0, atol=0)  # penultimate
    torch.testing.assert_close(context[:, :77, 16:40], out_g.hidden_states[-2], rtol=0, atol=0)
    assert not torch.equal(out_l.hidden_states[-2], out_l.last_hidden_state)  # the rule is not vacuous
    assert torch.count_nonzero(context[:, :77, 40:]) == 0  # zero-padded to T5's width
    torch.testing.assert_close(context[:, 77:], t5(PROMPTS, 20), rtol=0, atol=0)
    torch.testing.assert_close(pooled, torch.cat((out_l.text_embeds, out_g.text_embeds), -1), rtol=0, atol=0)


def test_sd3_without_t5_uses_zeros(folders):
    root, _ = folders
    clip_l = CLIPEncoder.from_folder(root / "clip_l_proj", with_projection=True)
    clip_g = CLIPEncoder.from_folder(root / "clip_g", with_projection=True)
    context, _ = SD3TextEncoder(clip_l, clip_g, None, t5_max_length=256, context_width=64)(PROMPTS)
    assert context.shape == (2, 77 + 256, 64) and torch.count_nonzero(context[:, 77:]) == 0


def test_over_long_prompt_is_truncated_with_a_warning(folders):
    root, _ = folders
    t5 = T5Encoder.from_folder(root / "t5", dtype=torch.float32)
    with pytest.warns(UserWarning, match="truncated"):
        out = t5(["a cat on the mat " * 5], 8)
    assert out.shape == (1, 8, 48)


def test_t5_never_runs_in_fp16(folders):
    root, _ = folders
    with pytest.warns(UserWarning, match="bfloat16"):
        t5 = T5Encoder.from_folder(root / "t5", dtype=torch.float16)
    assert t5.model.dtype == torch.bfloat16
    with pytest.raises(errors.InputError, match="float16"):
        T5Encoder(t5.model.half(), t5.tokenizer)


def test_missing_or_pickle_only_folders(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not found"):
        CLIPEncoder.from_folder(tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.CheckpointError, match="pytorch_model.bin"):
        T5Encoder.from_folder(tmp_path / "pickled")
