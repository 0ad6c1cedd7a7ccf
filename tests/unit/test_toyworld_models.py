"""Toy models: stock ComfyUI nodes run on them for both families (in-process, CPU); the shipped weights
fit them and state their recipe."""

import json
import os

import pytest
import torch

import comfy.model_patcher
import comfy.sd
import nodes

from comfyui_eligen.toyworld import data, models


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_stock_nodes_run_on_toy_models(family):
    model, clip, vae = models.load_toy_models(family, "random", seed=0)
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)

    (positive,) = nodes.CLIPTextEncode().encode(clip, "a red circle and a blue square")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    assert positive[0][0].shape == (1, 8, models.TEXT_WIDTH)  # 7 words + end token
    (latent,) = nodes.EmptyLatentImage().generate(128, 96, 2)
    (sampled,) = nodes.KSampler().sample(model, 0, 3, 2.0, "euler", "simple", positive, negative, latent)
    (images,) = nodes.VAEDecode().decode(vae, sampled)
    assert images.shape == (2, 96, 128, 3)
    assert torch.isfinite(images).all() and images.std() > 0

    # Encode-decode of a blocky image is exact (8x8 blocks survive the 8x pool and nearest upsample).
    blocks = torch.rand(1, 12, 16, 3).repeat_interleave(8, 1).repeat_interleave(8, 2)
    (encoded,) = nodes.VAEEncode().encode(vae, blocks)
    assert encoded["samples"].shape[1] == models.LATENT_CHANNELS
    assert encoded["samples"].shape[-2:] == (12, 16)
    (decoded,) = nodes.VAEDecode().decode(vae, encoded)
    assert torch.allclose(decoded, blocks, atol=1e-5)

    # The model sees RGB in [-1, 1] on the first three channels after the family's latent format.
    latent_in = model.model.process_latent_in(encoded["samples"]).flatten(2)
    assert torch.allclose(latent_in[:, :3].flatten(1), (blocks[0, ::8, ::8] * 2 - 1).permute(2, 0, 1).flatten()[None], atol=1e-5)
    assert latent_in[:, 3:].abs().max() < 1e-5


def test_random_weights_are_deterministic_and_seeded():
    a = models.load_toy_models("flux", "random", seed=3)[0].model.diffusion_model.state_dict()
    b = models.load_toy_models("flux", "random", seed=3)[0].model.diffusion_model.state_dict()
    c = models.load_toy_models("flux", "random", seed=4)[0].model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # every layer is live in random mode (no zero-initialised output layers)
    assert all(a[k].abs().sum() > 0 for k in a if not k.endswith("bias"))


def test_toy_text_encoder_word_order_padding_and_weights():
    clip = models.load_toy_models("flux", "random", seed=0)[1]
    encode = lambda text: clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    red_blue, pooled_rb = encode("red circle and blue square")
    blue_red, pooled_br = encode("blue circle and red square")
    assert not torch.allclose(red_blue, blue_red)
    # "bag of words" pooled vector: the same words in any order give the same pooled output
    assert torch.allclose(pooled_rb, pooled_br, atol=1e-6)

    clip.set_tokenizer_option("t5xxl_min_length", 12)
    padded, pooled_padded = encode("red circle and blue square")
    assert padded.shape[1] == 12 and red_blue.shape[1] == 6
    assert torch.allclose(padded[:, :6], red_blue) and torch.allclose(pooled_padded, pooled_rb)

    weighted = encode("(red:1.5) circle")[0]
    plain = encode("red circle")[0]
    assert torch.allclose(weighted[:, 0], 1.5 * plain[:, 0]) and torch.allclose(weighted[:, 1:], plain[:, 1:])


def test_unknown_words_hash_stably_into_spare_ids():
    assert models.word_id("red") == models.WORDS.index("red")
    hashed = models.word_id("zebra")
    assert len(models.WORDS) <= hashed < models.VOCAB_SIZE and hashed == models.word_id("zebra")


def test_bad_choices_name_the_problem():
    with pytest.raises(ValueError, match="sdxl"):
        models.load_toy_models("sdxl")
    with pytest.raises(ValueError, match="weights must be"):
        models.load_toy_models("flux", "trained")


def test_shipped_weights_stay_small():
    folder = models.WEIGHTS_DIR
    assert sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) <= 25 * 1024 * 1024


@pytest.mark.parametrize("family", sorted(models.FAMILIES))
def test_shipped_weights_fit_and_state_their_recipe(family):
    model_sd, _, metadata = models.read_weights(models.weights_path(family))
    info = json.loads(metadata["toy_world"])
    assert info["family"] == family and info["seconds"] > 0
    assert data.SIZE in info["image_sizes"]  # trained at the world's image size (16x16 tokens)
    # a fine-tune keeps the recipe it started from: back to the pretraining from scratch, which fitted
    chain = [info]
    while chain[-1].get("init_recipe"):
        chain.append(chain[-1]["init_recipe"])
    assert chain[-1]["family"] == family and chain[-1]["final_loss"] < 0.1 * chain[-1]["first_loss"]
    assert info["final_loss"] < 2 * chain[-1]["final_loss"]
    model = models.load_toy_models(family, "pretrained")[0]
    assert set(model.model.diffusion_model.state_dict()) == set(model_sd)


def test_missing_weights_file_says_how_to_build_it(tmp_path):
    with pytest.raises(ValueError, match="missing.*build-weights|build_weights"):
        models.load_toy_models("flux", "pretrained", weights_file=str(tmp_path / "none.safetensors"))
