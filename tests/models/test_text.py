"""fastflow's own CLIP and T5 encoders and tokenizers against transformers (the reference), on tiny
random encoders with tokenizer files written by the test: word-level tokenizer.json files with
CLIP- and T5-style special tokens, and a CLIP byte-level BPE folder with only vocab.json +
merges.txt (what FLUX's and SD3's tokenizer/ folders ship)."""

import json

import pytest
import torch
from transformers import CLIPTextConfig as HFCLIPConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import CLIPTokenizer, T5Config, T5EncoderModel

from fastflow import errors
from fastflow.loading import load_clip, load_t5
from fastflow.loading.text import load_text_model
from fastflow.loading.tokenizer import load_tokenizer
from fastflow.models.text import FluxTextEncoder, SD3TextEncoder, T5Encoder

from ..conftest import clip_tokenizer, t5_tokenizer, tiny_clip, tiny_t5

TOL = {"rtol": 1e-5, "atol": 1e-5}  # the fp32 parity bound


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    parts = {
        "clip_l": (tiny_clip(16, False, 1), clip_tokenizer(False)),
        "clip_l_proj": (tiny_clip(16, True, 1), clip_tokenizer(False)),
        "clip_g": (tiny_clip(24, True, 2, act="gelu"), clip_tokenizer(True)),
        "t5": (tiny_t5(48, 3), t5_tokenizer()),
    }
    for name, (model, tok) in parts.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root, {k: v for k, v in parts.items()}


PROMPTS = ["a handwritten seven", "the digit 3 on a mat"]


def _ref_ids(tokenizer, prompts, length):
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def test_flux_outputs_equal_transformers(folders):
    root, ref = folders
    clip = load_clip(root / "clip_l")
    t5 = load_t5(root / "t5", dtype=torch.float32)
    txt, y = FluxTextEncoder(clip, t5, max_length=12)(PROMPTS)
    ids_l, ids_t = _ref_ids(ref["clip_l"][1], PROMPTS, 77), _ref_ids(ref["t5"][1], PROMPTS, 12)
    assert torch.equal(clip.tokenize(PROMPTS), ids_l) and torch.equal(t5.tokenizer(PROMPTS, 12), ids_t)
    with torch.no_grad():
        torch.testing.assert_close(y, ref["clip_l"][0](ids_l).pooler_output, **TOL)
        torch.testing.assert_close(txt, ref["t5"][0](ids_t).last_hidden_state, **TOL)
    assert txt.shape == (2, 12, 48) and y.shape == (2, 16)
    assert ids_t[0].tolist() == [3, 4, 5, 1] + [0] * 8  # T5: EOS then <pad>, no mask anywhere
    assert ids_l[0, :5].tolist() == [1, 4, 5, 6, 2] and set(ids_l[0, 5:].tolist()) == {2}  # CLIP-L pads with EOS


def test_sd3_assembly(folders):
    root, ref = folders
    clip_l = load_clip(root / "clip_l_proj", with_projection=True)
    clip_g = load_clip(root / "clip_g", with_projection=True)
    t5 = load_t5(root / "t5", dtype=torch.float32)
    context, pooled = SD3TextEncoder(clip_l, clip_g, t5, t5_max_length=20)(PROMPTS)
    assert context.shape == (2, 77 + 20, 48) and pooled.shape == (2, 24 + 32)

    ids_g = clip_g.tokenize(PROMPTS)
    assert torch.equal(ids_g, _ref_ids(ref["clip_g"][1], PROMPTS, 77))
    assert ids_g[0, :5].tolist() == [1, 4, 5, 6, 2] and set(ids_g[0, 5:].tolist()) == {0}  # CLIP-G pads with 0
    with torch.no_grad():
        out_l = ref["clip_l_proj"][0](clip_l.tokenize(PROMPTS), output_hidden_states=True)
        out_g = ref["clip_g"][0](ids_g, output_hidden_states=True)
    torch.testing.assert_close(context[:, :77, :16], out_l.hidden_states[-2], **TOL)  # penultimate
    torch.testing.assert_close(context[:, :77, 16:40], out_g.hidden_states[-2], **TOL)
    assert not torch.allclose(out_l.hidden_states[-2], out_l.last_hidden_state)  # the rule is not vacuous
    assert torch.count_nonzero(context[:, :77, 40:]) == 0  # zero-padded to T5's width
    torch.testing.assert_close(context[:, 77:], t5(PROMPTS, 20), rtol=0, atol=0)
    torch.testing.assert_close(pooled, torch.cat((out_l.text_embeds, out_g.text_embeds), -1), **TOL)


def _hf_clip(eos_token_id, act, seed=5):
    torch.manual_seed(seed)
    cfg = HFCLIPConfig(
        vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=20, hidden_act=act, eos_token_id=eos_token_id, bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return HFCLIPTextModel(cfg).eval()


@pytest.mark.parametrize("eos_token_id, act", [(7, "quick_gelu"), (2, "gelu")])
def test_clip_pooling_rule_and_activation(tmp_path, eos_token_id, act):
    """Pooled = the first ``eos_token_id`` (new configs) or the largest id (legacy eos 2), as in transformers."""
    model = _hf_clip(eos_token_id, act)
    model.save_pretrained(tmp_path)
    ours = load_text_model("clip", tmp_path, "CLIP", torch.float32, "cpu")
    ids = torch.tensor([[1, 9, 7, 30, 7, 0], [1, 7, 44, 3, 0, 0]])
    with torch.no_grad():
        expect, got = model(ids, output_hidden_states=True), ours(ids)
    torch.testing.assert_close(got.pooler_output, expect.pooler_output, **TOL)
    torch.testing.assert_close(got.last_hidden_state, expect.last_hidden_state, **TOL)
    torch.testing.assert_close(got.penultimate, expect.hidden_states[-2], **TOL)


@pytest.mark.parametrize("proj", ["relu", "gated-gelu", "gated-silu"])
def test_t5_variants_and_long_sequences(tmp_path, proj):
    """Plain and gated MLPs; 300 tokens reach T5's logarithmic position buckets on both sides."""
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=60, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj=proj,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, decoder_start_token_id=0,
    )  # fmt: skip
    model = T5EncoderModel(cfg).eval()
    model.save_pretrained(tmp_path)
    ours = load_text_model("t5", tmp_path, "T5", torch.float32, "cpu")
    ids = torch.randint(0, 60, (2, 300))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), model(ids).last_hidden_state, **TOL)


def test_bf16_close_to_fp32(folders):
    """bf16 text features stay within bf16's reach of fp32 (no fp32-only assumption in the forward)."""
    root, _ = folders
    t5_32, t5_16 = (load_t5(root / "t5", dtype=d) for d in (torch.float32, torch.bfloat16))
    clip_32, clip_16 = (load_clip(root / "clip_l", dtype=d) for d in (torch.float32, torch.bfloat16))
    a, b = t5_32(PROMPTS, 12), t5_16(PROMPTS, 12)
    assert b.dtype == torch.bfloat16 and (b.float() - a).norm() / a.norm() < 3e-2
    a, b = clip_32(PROMPTS)[1], clip_16(PROMPTS)[1]
    assert b.dtype == torch.bfloat16 and (b.float() - a).norm() / a.norm() < 3e-2


def _clip_bpe_folder(folder):
    """A byte-level BPE with CLIP's ``</w>`` suffix trained on a few sentences, saved as vocab.json +
    merges.txt + tokenizer_config.json (no tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    corpus = ["a photo of a cat on a mat", "the digit seven, handwritten!", "it's a dog's life 1234", "naïve café"]
    tok.train_from_iterator(corpus * 20, trainer)
    folder.mkdir()
    tok.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    return folder


def test_clip_bpe_from_vocab_and_merges_equals_transformers(tmp_path):
    folder = _clip_bpe_folder(tmp_path / "tok")
    assert not (folder / "tokenizer.json").exists()
    ours = load_tokenizer(folder, "CLIP", "clip")
    theirs = CLIPTokenizer.from_pretrained(folder)
    prompts = ["A PHOTO of a cat", "it's  a\tdog's   life, 1234!", "naïve café (unicode) ☃", "", "x" * 40,
               "the digit seven " * 30]  # fmt: skip
    for length in (77, 8):
        assert torch.equal(ours(prompts, length), _ref_ids(theirs, prompts, length)), length
    assert ours.lengths(prompts) == [len(i) for i in theirs(prompts).input_ids]


def test_slow_only_tokenizer_folder_needs_transformers_or_says_which_file(tmp_path, monkeypatch):
    folder = tmp_path / "t5tok"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"\x00")
    (folder / "tokenizer_config.json").write_text("{}")
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(errors.CheckpointError, match=r"no tokenizer\.json.*spiece\.model"):
        load_tokenizer(folder, "T5 encoder", "t5")


def test_tokenizer_config_errors(tmp_path, folders):
    import shutil

    root, _ = folders
    folder = tmp_path / "tok"
    shutil.copytree(root / "clip_l", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<nope>"}))
    with pytest.raises(errors.CheckpointError, match="pad token '<nope>'"):
        load_tokenizer(folder, "CLIP", "clip")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": -3}))
    with pytest.raises(errors.CheckpointError, match="model_max_length"):
        load_tokenizer(folder, "CLIP", "clip")


def test_unsupported_activation_is_typed(tmp_path):
    _hf_clip(2, "quick_gelu").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "swish_of_doom"}))
    with pytest.raises(errors.CheckpointError, match="swish_of_doom"):
        load_text_model("clip", tmp_path, "CLIP", torch.float32, "cpu")


def test_sd3_without_t5_uses_zeros(folders):
    root, _ = folders
    clip_l = load_clip(root / "clip_l_proj", with_projection=True)
    clip_g = load_clip(root / "clip_g", with_projection=True)
    context, _ = SD3TextEncoder(clip_l, clip_g, None, t5_max_length=256, context_width=64)(PROMPTS)
    assert context.shape == (2, 77 + 256, 64) and torch.count_nonzero(context[:, 77:]) == 0


def test_over_long_prompt_is_truncated_with_a_warning(folders):
    root, _ = folders
    t5 = load_t5(root / "t5", dtype=torch.float32)
    with pytest.warns(UserWarning, match="truncated"):
        out = t5(["a cat on the mat " * 5], 8)
    assert out.shape == (1, 8, 48)


def test_t5_never_runs_in_fp16(folders):
    root, _ = folders
    with pytest.warns(UserWarning, match="bfloat16"):
        t5 = load_t5(root / "t5", dtype=torch.float16)
    assert t5.model.dtype == torch.bfloat16
    with pytest.raises(errors.InputError, match="float16"):
        T5Encoder(t5.model.half(), t5.tokenizer)


def test_missing_or_pickle_only_folders(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not found"):
        load_clip(tmp_path / "nope")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(errors.CheckpointError, match="pytorch_model.bin"):
        load_t5(tmp_path / "pickled")


def test_tokenizer_is_safe_to_share_between_threads(folders):
    """Concurrent generations share one tokenizer; its padding / truncation settings must not leak
    between calls of different lengths."""
    import threading

    root, _ = folders
    tok = load_tokenizer(root / "t5", "T5", "t5")
    expected = {n: tok(PROMPTS, n) for n in (3, 12)}
    errors_seen = []

    def hammer(n):
        try:
            for _ in range(300):
                assert torch.equal(tok(PROMPTS, n), expected[n])
                assert tok.lengths(PROMPTS) == [4, 7]
        except Exception as e:  # noqa: BLE001 - reported below
            errors_seen.append(e)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (3, 12, 3, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors_seen, errors_seen[0]


@pytest.mark.parametrize("width, act", [(768, "quick_gelu"), (128, "gelu")])
def test_clip_single_file_config_from_shapes(tmp_path, folders, width, act):
    """Official single files (clip_l / clip_g .safetensors) have no config.json: the config comes from
    the shapes (OpenAI CLIP-L at width 768 uses quick_gelu, OpenCLIP widths gelu), keys under the
    older ``text_model.`` prefix, a logit_scale beside them, the tokenizer from its own folder."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = HFCLIPConfig(vocab_size=len(clip_tokenizer(False)), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=77,
                       hidden_act=act, projection_dim=width, eos_token_id=2)  # fmt: skip
    from transformers import CLIPTextModelWithProjection

    ref = CLIPTextModelWithProjection(cfg).eval()
    state = {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in ref.state_dict().items()
        if not k.endswith("position_ids")
    }
    save_file({**state, "logit_scale": torch.tensor(4.6)}, str(tmp_path / "clip.safetensors"))
    root, _ = folders
    with pytest.raises(errors.CheckpointError, match="carries no tokenizer"):
        load_clip(tmp_path / "clip.safetensors", with_projection=True)
    ours = load_clip(tmp_path / "clip.safetensors", root / "clip_l", with_projection=True)
    assert ours.model.config.hidden_act == act and ours.model.config.num_hidden_layers == 2
    ids = ours.tokenize(PROMPTS)
    with torch.no_grad():
        expect = ref(ids, output_hidden_states=True)
    seq, pooled = ours(PROMPTS)
    torch.testing.assert_close(seq, expect.hidden_states[-2], **TOL)
    torch.testing.assert_close(pooled, expect.text_embeds, **TOL)


def test_t5_single_file_config_from_shapes(tmp_path, folders):
    from safetensors.torch import save_file

    root, ref = folders
    model = ref["t5"][0]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(tmp_path / "t5xxl.safetensors"))
    t5 = load_t5(tmp_path / "t5xxl.safetensors", root / "t5", dtype=torch.float32)
    cfg = t5.model.config
    assert (cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.gated) == (2, 4, 8, 64, True)
    ids = t5.tokenizer(PROMPTS, 12)
    with torch.no_grad():
        torch.testing.assert_close(t5(PROMPTS, 12), model(ids).last_hidden_state, **TOL)


def test_t5_runs_in_fp8(folders):
    """T5's linears go through ops.linear, so fastflow.quant.quantize_ turns them into FP8 layers."""
    from fastflow.quant import Fp8Linear, quantize_

    root, _ = folders
    t5 = load_t5(root / "t5", dtype=torch.bfloat16)
    before = t5(PROMPTS, 12).float()
    quantize_(t5.model)
    linears = [m for m in t5.model.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear))]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)
    after = t5(PROMPTS, 12).float()
    assert after.shape == before.shape and (after - before).norm() / before.norm() < 0.1
