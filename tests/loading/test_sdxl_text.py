"""SDXL single files hold both text encoders: CLIP-L with transformers' names under
``conditioner.embedders.0.transformer.``, OpenCLIP-G in open_clip's layout under
``conditioner.embedders.1.model.``. Our reading of the open_clip layout is checked against
diffusers' own converter (``convert_open_clip_checkpoint``) on random tensors."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from fastflow.errors import MissingKeysError
from fastflow.loading import load_clip

from ..conftest import WORDS, clip_tokenizer, tiny_clip

G = "conditioner.embedders.1.model."
L = "conditioner.embedders.0.transformer."
W, P, LAYERS, VOCAB = 128, 96, 3, len(WORDS) + 4


def openclip_state(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, around=0.0):
        return around + 0.1 * torch.randn(*shape, generator=g)

    state = {
        "token_embedding.weight": r(VOCAB, W),
        "positional_embedding": r(77, W),
        "ln_final.weight": r(W, around=1.0),
        "ln_final.bias": r(W),
        "text_projection": r(W, P),  # x @ text_projection
        "logit_scale": torch.tensor(4.6),
    }
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        state |= {
            b + "ln_1.weight": r(W, around=1.0), b + "ln_1.bias": r(W),
            b + "attn.in_proj_weight": r(3 * W, W), b + "attn.in_proj_bias": r(3 * W),
            b + "attn.out_proj.weight": r(W, W), b + "attn.out_proj.bias": r(W),
            b + "ln_2.weight": r(W, around=1.0), b + "ln_2.bias": r(W),
            b + "mlp.c_fc.weight": r(4 * W, W), b + "mlp.c_fc.bias": r(4 * W),
            b + "mlp.c_proj.weight": r(W, 4 * W), b + "mlp.c_proj.bias": r(W),
        }  # fmt: skip
    return state


def hf_names(state: dict) -> dict:
    """CLIP-L as SDXL files store it: transformers 4's ``text_model.`` names."""
    return {(k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v
            for k, v in state.items()}  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_text")
    state = {G + k: v for k, v in openclip_state().items()}
    # SDXL's CLIP-L: heads of 64 (the shapes cannot show heads); gelu as any CLIP not 768 wide
    clip_l = tiny_clip(128, False, seed=1, act="gelu")
    state |= {L + k: v for k, v in hf_names(clip_l.state_dict()).items()}
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the UNet's, not read here
    save_file({k: v.contiguous() for k, v in state.items()}, root / "sd_xl.safetensors")
    for name, pad_zero in (("tokenizer", False), ("tokenizer_2", True)):
        tok = clip_tokenizer(pad_zero)
        tok.model_max_length = 77
        tok.save_pretrained(root / name)
    return root, clip_l


def test_openclip_g_equals_diffusers_conversion(sdxl_file):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    root, _ = sdxl_file
    cfg = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=W, intermediate_size=4 * W, num_hidden_layers=LAYERS,
        num_attention_heads=W // 64, max_position_embeddings=77, projection_dim=P, hidden_act="gelu",
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    ref = CLIPTextModelWithProjection(cfg).eval()
    converted = convert_open_clip_checkpoint(ref, {G + k: v for k, v in openclip_state().items()}, prefix=G)
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ours = load_clip(root / "sd_xl.safetensors", root / "tokenizer_2", with_projection=True, role="clip_g")
    ids = ours.tokenize(["a handwritten seven", "the cat on the mat"])
    with torch.no_grad():
        theirs = ref(ids, output_hidden_states=True)
        mine = ours.model(ids)
    torch.testing.assert_close(mine.penultimate, theirs.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.text_embeds, theirs.text_embeds, rtol=1e-5, atol=1e-5)
    assert ours.model.config.hidden_act == "gelu" and ours.model.config.num_attention_heads == 2


def test_clip_l_is_read_from_its_prefix(sdxl_file):
    root, clip_l = sdxl_file
    ours = load_clip(root / "sd_xl.safetensors", root / "tokenizer", role="clip_l")
    ids = ours.tokenize(["a handwritten seven"])
    with torch.no_grad():
        theirs = clip_l(ids, output_hidden_states=True)
        mine = ours.model(ids)
    torch.testing.assert_close(mine.penultimate, theirs.hidden_states[-2], rtol=1e-5, atol=1e-6)


def test_a_missing_tensor_is_named(tmp_path):
    state = {G + k: v for k, v in openclip_state().items() if "resblocks.1.attn.in_proj_weight" not in k}
    save_file(state, tmp_path / "broken.safetensors")
    clip_tokenizer(True).save_pretrained(tmp_path / "tok")
    with pytest.raises(MissingKeysError, match="resblocks.1.attn.in_proj_weight"):
        load_clip(tmp_path / "broken.safetensors", tmp_path / "tok", with_projection=True, role="clip_g")
