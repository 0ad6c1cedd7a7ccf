"""EliGen Entity / EliGen Apply as plain calls: chaining, text encoding options, and every bad input
getting a message that names the entity."""

import pytest
import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base
import comfy.text_encoders.flux
from comfyui_eligen.core import conditioning, host, patch
from comfyui_eligen.nodes.entities import EliGenApply, EliGenEntity
from tiny_models import TEXT_WIDTH, tiny_flux, tiny_qwen_image


def box_mask(h=32, w=48, batch=None):
    mask = torch.zeros(h, w)
    mask[h // 4: 3 * h // 4, w // 4: w // 2] = 1.0
    return mask if batch is None else mask[None].repeat(batch, 1, 1)


def encoded(length=4, width=TEXT_WIDTH, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, width, generator=generator), {"pooled_output": torch.zeros(1, width)}]]


def entity_chain(count, **kwargs):
    entities = None
    for i in range(count):
        entities = EliGenEntity.execute(mask=box_mask(), conditioning=encoded(seed=i), label=f"thing {i}",
                                        previous=entities, **kwargs).result[0]
    return entities


class TinyT5Encoder(torch.nn.Module):
    """A text encoder for the real FLUX tokenizer: one embedding per T5 token id."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__()
        self.table = torch.nn.Embedding(32128, TEXT_WIDTH)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))
        self.dtypes = {torch.float32}

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        ids = torch.tensor([[int(token) for token, _ in token_weight_pairs["t5xxl"][0]]])
        embeds = self.table(ids)
        return embeds, embeds.mean(1)

    def load_sd(self, sd):
        return self.load_state_dict(sd, strict=False)


@pytest.fixture(scope="module")
def flux_tokenizer_clip():
    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, TinyT5Encoder)
    return comfy.sd.CLIP(target=target)


def test_entities_chain_in_order_up_to_sixteen():
    entities = entity_chain(16)
    assert [e.label for e in entities] == [f"thing {i}" for i in range(16)]
    assert all(e.embeds.shape == (1, 4, TEXT_WIDTH) and e.mask.shape == (32, 48) for e in entities)
    # a chain is a new tuple each time: the previous list is not changed
    shorter = entity_chain(2)
    longer = EliGenEntity.execute(mask=box_mask(), conditioning=encoded(), previous=shorter).result[0]
    assert len(shorter) == 2 and len(longer) == 3 and longer[2].label == "entity 3"


def test_seventeenth_entity_is_refused_by_name():
    with pytest.raises(ValueError, match=r'entity 17 \("one too many"\).*at most 16'):
        EliGenEntity.execute(mask=box_mask(), conditioning=encoded(), label="one too many", previous=entity_chain(16))


def test_several_masks_for_one_prompt_is_an_error_naming_the_counts():
    with pytest.raises(ValueError, match=r'entity 1 \("red circle"\): the mask input holds 3 masks but there is one prompt'):
        EliGenEntity.execute(mask=box_mask(batch=3), conditioning=encoded(), label="red circle")


def test_all_zero_mask_is_an_error_naming_the_entity():
    with pytest.raises(ValueError, match=r'entity 3 \("blue square"\): the mask is empty'):
        EliGenEntity.execute(mask=torch.zeros(1, 32, 48), conditioning=encoded(), label="blue square",
                             previous=entity_chain(2))


def test_prompt_source_must_be_one_of_conditioning_or_clip_and_text(flux_tokenizer_clip):
    with pytest.raises(ValueError, match="connect either a conditioning or a clip"):
        EliGenEntity.execute(mask=box_mask(), conditioning=encoded(), clip=flux_tokenizer_clip, text="a cat")
    with pytest.raises(ValueError, match="connect a conditioning, or a clip and a text"):
        EliGenEntity.execute(mask=box_mask(), label="lonely")
    with pytest.raises(ValueError, match=r'entity 1 \("entity 1"\): the text is empty'):
        EliGenEntity.execute(mask=box_mask(), clip=flux_tokenizer_clip, text="  ")
    with pytest.raises(ValueError, match="2 entries"):
        EliGenEntity.execute(mask=box_mask(), conditioning=encoded() + encoded(seed=1), label="combined")


def test_flux_entity_text_is_padded_to_512_or_kept_at_real_length(flux_tokenizer_clip):
    padded = EliGenEntity.execute(mask=box_mask(), clip=flux_tokenizer_clip, text="a red circle",
                                  text_length="padded_512").result[0][0]
    real = EliGenEntity.execute(mask=box_mask(), clip=flux_tokenizer_clip, text="a red circle",
                                text_length="real_length").result[0][0]
    stock = flux_tokenizer_clip.encode_from_tokens(flux_tokenizer_clip.tokenize("a red circle"))
    assert padded.embeds.shape[1] == 512 and stock.shape[1] == 256  # ComfyUI's own default is 256
    assert 2 <= real.embeds.shape[1] < 10
    torch.testing.assert_close(padded.embeds[:, :real.embeds.shape[1]], real.embeds)  # same tokens, then padding
    assert padded.label == "a red circle"


def test_apply_returns_a_patched_clone_and_the_entity_conditioning():
    model = tiny_flux()
    entities = entity_chain(3)
    positive = encoded(length=5)
    out_model, out_positive, out_negative = EliGenApply.execute(model=model, positive=positive, entities=entities).result
    assert out_model is not model and host.models.diffusion_model_wrappers(out_model, patch.WRAPPER_KEY)
    assert not host.models.diffusion_model_wrappers(model, patch.WRAPPER_KEY)  # the input MODEL is untouched
    tensor, options = out_positive[0]
    assert tensor.shape == (1, 3 * 4 + 5, TEXT_WIDTH)
    torch.testing.assert_close(tensor[:, -5:], positive[0][0])
    condition = options["model_conds"]["eligen"]
    assert condition.segment_lengths == (4, 4, 4, 5) and condition.masks.shape == (1, 3, 32, 48)
    assert "model_conds" not in positive[0][1]  # the input conditioning is untouched
    # no negative given: the zeroed positive, like ConditioningZeroOut
    assert torch.count_nonzero(out_negative[0][0]) == 0 and out_negative[0][0].shape == positive[0][0].shape


# Other families built on ComfyUI's FLUX classes (subclasses of model_base.Flux), tiny. Chroma is in every
# tested ComfyUI; FLUX.2 only in newer ones, so its case runs where ComfyUI has the model class.
OTHER_FAMILIES = {
    "Chroma": {"image_model": "chroma", "in_channels": 16, "out_channels": 16, "context_in_dim": TEXT_WIDTH,
               "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
               "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64,
               "out_dim": 64, "hidden_dim": 32, "n_layers": 1},
    "Flux2": {"image_model": "flux2", "in_channels": 16, "out_channels": 16, "vec_in_dim": None,
              "context_in_dim": TEXT_WIDTH, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
              "depth_single_blocks": 1, "axes_dim": [8, 8, 8, 8], "theta": 2000, "patch_size": 1,
              "qkv_bias": False, "guidance_embed": False, "global_modulation": True, "mlp_silu_act": True,
              "ops_bias": False},
}


@pytest.mark.parametrize("family", [
    "Chroma",
    pytest.param("Flux2", marks=pytest.mark.skipif(
        not hasattr(comfy.supported_models, "Flux2"),
        reason="this ComfyUI has no FLUX.2 model class (comfy.supported_models.Flux2)")),
])
def test_unsupported_family_is_named(family):
    config_class = getattr(comfy.supported_models, family)
    model = comfy.model_patcher.ModelPatcher(config_class(OTHER_FAMILIES[family]).get_model({}),
                                             comfy.model_management.get_torch_device(), "cpu")
    with pytest.raises(ValueError, match=f"EliGen supports FLUX.1 and Qwen-Image; this model is {family}"):
        EliGenApply.execute(model=model, positive=encoded(), entities=entity_chain(1))


@pytest.mark.parametrize("make_model, name", [(tiny_flux, "FLUX.1"), (tiny_qwen_image, "Qwen-Image")])
def test_text_from_another_encoder_is_an_error_naming_the_entity(make_model, name):
    model = make_model()
    entities = entity_chain(1) + (conditioning.Entity(encoded(width=48)[0][0], box_mask(), "wide one"),)
    with pytest.raises(ValueError, match=rf'entity 2 \("wide one"\): its text embeddings are 48 wide but this '
                                         rf'{name} model expects {TEXT_WIDTH}'):
        EliGenApply.execute(model=model, positive=encoded(), entities=entities)
    with pytest.raises(ValueError, match=rf"the prompt conditioning is 48 wide but this {name} model expects"):
        EliGenApply.execute(model=model, positive=encoded(width=48), entities=entity_chain(1))
    with pytest.raises(ValueError, match="prompt conditioning is 48 wide"):
        EliGenApply.execute(model=model, positive=encoded(), negative=encoded(width=48), entities=entity_chain(1))


def test_masks_of_different_aspects_within_one_list_are_refused():
    entities = entity_chain(1) + (conditioning.Entity(encoded()[0][0], box_mask(32, 32), "square one"),)
    with pytest.raises(ValueError, match=r'entity 2 \("square one"\): mask is 32x32 .* entity 1 \("thing 0"\) has 48x32'):
        EliGenApply.execute(model=tiny_flux(), positive=encoded(), entities=entities)


def test_bad_step_range_and_too_many_entities_at_apply():
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        EliGenApply.execute(model=tiny_flux(), positive=encoded(), entities=entity_chain(1), start_percent=0.8,
                            end_percent=0.2)
    too_many = entity_chain(16) + entity_chain(1)
    with pytest.raises(ValueError, match="17 entities given; EliGen takes at most 16"):
        EliGenApply.execute(model=tiny_flux(), positive=encoded(), entities=too_many)


# ---- broken text encoders: named by every node that encodes entity prompts ------------------------

def broken_toy_clip(kind):
    """The toy text encoder with its word table made NaN, infinite, or a million times too large."""
    from comfyui_eligen.toyworld.models import build_clip

    weights = build_clip().cond_stage_model.state_dict()
    [key] = [k for k in weights if k.endswith("word_table")]
    factor = {"nan": float("nan"), "inf": float("inf"), "huge": 1e6}[kind]
    return build_clip(text_encoder_sd={**weights, key: weights[key] * factor})


BROKEN = [("nan", "hold NaN or inf values"), ("inf", "hold NaN or inf values"),
          ("huge", "hold values as large as ")]


@pytest.mark.parametrize("kind, problem", BROKEN, ids=[kind for kind, _ in BROKEN])
def test_a_broken_text_encoder_is_named_by_entity_and_layout_nodes(kind, problem):
    from comfyui_eligen.nodes.layouts import EliGenBoxLayout, EliGenPaintedLayout
    from test_layouts import PROMPTS, painted

    clip = broken_toy_clip(kind)
    calls = {
        'entity 3 ("red circle")': lambda: EliGenEntity.execute(
            mask=box_mask(), clip=clip, text="red circle", previous=entity_chain(2)),
        'entity 1 ("red circle")': lambda: EliGenPaintedLayout.execute(painted()[0], clip, PROMPTS),
        'entity 2 ("a blue square")': lambda: EliGenBoxLayout.execute(
            "0.5, 0.5, 0.5, 0.5", "a blue square", clip, 128, 128, previous=entity_chain(1)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"{name}: the text embeddings from clip {problem}"), message
        assert "would give a black image" in message


@pytest.mark.parametrize("value, problem", [(float("nan"), "(1 NaN and 0 infinite of 128)"),
                                            (float("-inf"), "(0 NaN and 1 infinite of 128)"),
                                            (-7e4, "as large as 7e+04; text embeddings stay far below 65504")])
def test_a_broken_conditioning_is_named_and_healthy_large_values_pass(value, problem):
    embeds = encoded()
    embeds[0][0][0, 2, 5] = value
    with pytest.raises(ValueError) as error:
        EliGenEntity.execute(mask=box_mask(), conditioning=embeds, label="sky")
    assert str(error.value).startswith('entity 1 ("sky"): the text embeddings from the conditioning hold')
    assert problem in str(error.value)
    embeds[0][0][0, 2, 5] = 6e4  # within fp16's range: kept
    assert EliGenEntity.execute(mask=box_mask(), conditioning=embeds, label="sky").result[0][0].embeds[0, 2, 5] == 6e4
