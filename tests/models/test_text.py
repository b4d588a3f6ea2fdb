"""Text encoders against a direct transformers computation, on tiny random encoders with
tokenizer files written by the test (word-level, CLIP-style and T5-style special tokens)."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from fastflow import errors
from fastflow.models.text import CLIPEncoder, FluxTextEncoder, SD3TextEncoder, T5Encoder

WORDS = ["a", "handwritten", "seven", "the", "digit", "3", "number", "nine", "cat", "on", "mat"]


def _clip_tokenizer(pad_zero: bool):
    """CLIP-style: <|startoftext|> ... <|endoftext|>; CLIP-L pads with EOS, CLIP-G with id 0 ("!")."""
    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 1), ("<|endoftext|>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="!" if pad_zero else "<|endoftext|>",
    )


def _t5_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def _clip(width, projection, seed):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=width + 8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(seed):
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(WORDS) + 3,
        d_model=48,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    parts = {
        "clip_l": (_clip(16, False, 1), _clip_tokenizer(False)),
        "clip_l_proj": (_clip(16, True, 1), _clip_tokenizer(False)),
        "clip_g": (_clip(24, True, 2), _clip_tokenizer(True)),
        "t5": (_t5(3), _t5_tokenizer()),
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
