"""FLUX.1-dev: this package in ComfyUI against DiffSynth-Studio's EliGen on the same weights.

The real architecture (hidden 3072, 24 heads, T5 width 4096, CLIP pooled 768, guidance embedding) at
reduced depth: 1 double block and 1 single block (2.2 GB of float32 weights shared by both models; the
loading peak and the LoRA checks must fit the 6 GB test budget). tests/support/reference_pair.py tells how both get
the same weights and holds the comparisons. Float32 on the CPU, a 96x64 image (8x12 latent, 4x6 tokens).

Entity text: the reference stacks entity embeddings into one tensor, so every entity has the global
prompt's length (what its T5 padding to ``t5_sequence_length`` gives); those cases run the reference as it
is. This package also takes entities at their real length, which the reference cannot express; there the
reference's own rule (``construct_mask`` on one token per text segment) is expanded to the real segment
lengths and run through the reference's model function and DiT blocks (``real_length_entities``).
"""

import contextlib

import comfy.ldm.flux.model
import comfy.ops
import pytest
import torch
from diffsynth_reference import reference
from reference_pair import (
    Family,
    ReferencePipeline,
    check_cfg_on_negative,
    check_entity_call,
    check_lora_roundtrip,
    check_plain_forward,
    check_sampling_run,
    check_training_step,
    pair_fixtures,
)

DEPTH, SINGLE_DEPTH = 1, 1
GUIDANCE = 3.5
FLUX_DEV = {  # FLUX.1-dev's configuration, at reduced depth
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": DEPTH, "depth_single_blocks": SINGLE_DEPTH,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def checkpoint_shapes():
    """The original (BFL) FLUX.1-dev checkpoint layout at reduced depth: ComfyUI's FLUX module names are
    those of the released file, read here from the module built on the meta device."""
    with torch.device("meta"):
        module = comfy.ldm.flux.model.Flux(**FLUX_DEV, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


def build_reference(state):
    """The reference's FluxDiT through its own loader and converter (single blocks cut to SINGLE_DEPTH:
    its constructor fixes 38)."""
    ref = reference()

    class ReducedFluxDiT(ref.flux_dit.FluxDiT):
        def __init__(self, num_blocks, num_single_blocks):
            super().__init__(num_blocks=num_blocks)
            self.single_blocks = self.single_blocks[:num_single_blocks]

    def converter(state_dict):
        converted = ref.flux_converter.FluxDiTStateDictConverter(state_dict)
        assert len(converted) == len(state_dict), "the reference's converter dropped checkpoint keys"
        return converted

    return ref.loader.load_model(ReducedFluxDiT, None, config={"num_blocks": DEPTH, "num_single_blocks": SINGLE_DEPTH},
                                 torch_dtype=torch.float32, device="cpu", state_dict_converter=converter, state_dict=state)


@contextlib.contextmanager
def real_length_entities(dit):
    """The reference's entity step for entity texts of their own lengths (it has none): its rule
    ``construct_mask`` on one token per text segment, rows and columns repeated to the real lengths;
    the text embedded and positioned (all zeros) as the reference does for padded entities."""

    def process(hidden_states, prompt_emb, entity_prompt_emb, entity_masks, text_ids, image_ids, repeat_dim):
        count = entity_masks.shape[1]
        masks = [entity_masks[:, i].repeat(1, repeat_dim, 1, 1) for i in range(count)]
        masks.append(torch.ones_like(masks[0]))
        one_token = dit.construct_mask(masks, 1, hidden_states.shape[1])  # [B, N+1+T, N+1+T], additive
        lengths = [e.shape[1] for e in entity_prompt_emb] + [prompt_emb.shape[1]]
        rows = torch.cat([torch.repeat_interleave(torch.arange(count + 1), torch.tensor(lengths)),
                          count + 1 + torch.arange(hidden_states.shape[1])])
        attention_mask = one_token[:, rows][:, :, rows].unsqueeze(1).to(hidden_states)
        text = torch.cat([dit.context_embedder(e) for e in list(entity_prompt_emb) + [prompt_emb]], dim=1)
        text_ids = torch.zeros(1, sum(lengths), 3)
        return text, dit.pos_embedder(torch.cat((text_ids, image_ids), dim=1)), attention_mask

    dit.process_entity_masks = process
    try:
        yield
    finally:
        del dit.process_entity_masks


class Flux(Family):
    name = "FLUX.1"
    global_length = 8
    # examples/flux/model_training/lora/FLUX.1-dev-EliGen.sh
    reference_lora_targets = ("a_to_qkv,b_to_qkv,ff_a.0,ff_a.2,ff_b.0,ff_b.2,a_to_out,b_to_out,proj_out,norm.linear,"
                              "norm1_a.linear,norm1_b.linear,to_qkv_mlp")
    lora_format = "kohya"
    training_guidance = 1.0  # the reference trains FLUX.1-dev with embedded guidance 1

    def prompt(self, seed, length=None):
        """T5 text embeddings [1, L, 4096]."""
        return torch.randn(1, length or self.global_length, 4096, generator=torch.Generator().manual_seed(seed))

    def pooled(self, seed):
        """The CLIP pooled vector [1, 768]."""
        return torch.randn(1, 768, generator=torch.Generator().manual_seed(seed + 50000))

    def comfy_prompt(self, seed):
        return [[self.prompt(seed), {"pooled_output": self.pooled(seed), "guidance": GUIDANCE}]]

    def noise(self, seed=7):
        return torch.randn((1, 16) + self.latent, generator=torch.Generator().manual_seed(seed))

    def pipeline(self, dit):
        ref = reference()
        return ReferencePipeline(ref.flux_pipeline.FluxImagePipeline, ref.flux_pipeline.FluxImageUnit_EntityControl,
                                 dit, self.latent, guidance=torch.tensor([GUIDANCE]))

    def reference_inputs(self, seed, embeds=None, masks=None):
        prompt_emb = self.prompt(seed)
        out = {"prompt_emb": prompt_emb, "pooled_prompt_emb": self.pooled(seed),
               "text_ids": torch.zeros(1, prompt_emb.shape[1], 3)}
        if embeds is not None:
            padded = {e.shape[1] for e in embeds} == {self.global_length}
            out["entity_prompt_emb"] = torch.stack([e[0] for e in embeds])[None] if padded else embeds
            out["entity_masks"] = masks
        return out

    def training_inputs(self):
        return {"guidance": torch.tensor([self.training_guidance])}

    def entity_step(self, dit, lengths):
        return contextlib.nullcontext() if set(lengths) == {self.global_length} else real_length_entities(dit)

    def reference_module(self, name):
        """Through the reference's own checkpoint converter (``img_attn.qkv`` -> ``attn.a_to_qkv`` ...)."""
        (key,) = reference().flux_converter.FluxDiTStateDictConverter({f"{name}.weight": torch.zeros(0)})
        return key[: -len(".weight")]


FLUX = Flux()
PADDED = [FLUX.global_length]


pair, flux = pair_fixtures(FLUX, checkpoint_shapes, build_reference, "flux")


# 1. Same weights in both

def test_same_weights_in_both_and_the_plain_forward_agrees(flux):
    params = flux.diffusion_model.params  # what ComfyUI's detection found in the checkpoint
    assert (params.depth, params.depth_single_blocks, params.hidden_size, params.num_heads) == (DEPTH, SINGLE_DEPTH, 3072, 24)
    assert params.guidance_embed and params.context_in_dim == 4096 and params.vec_in_dim == 768
    dit = flux.reference
    assert len(dit.blocks) == DEPTH and len(dit.single_blocks) == SINGLE_DEPTH
    assert dit.blocks[0].attn.a_to_qkv.weight.data_ptr() == flux.diffusion_model.double_blocks[0].img_attn.qkv.weight.data_ptr()
    check_plain_forward(FLUX, flux)


# 2. Entity sampling

ENTITY_CASES = [
    # id, masks, entity text lengths (the global prompt's: padded as the reference pads)
    ("1 entity, padded", "one", PADDED),
    ("2 entities overlapping, padded", "two overlapping", PADDED * 2),
    ("4 entities, masks at other sizes, padded", "four at other sizes", PADDED * 4),
    ("8 entities overlapping, real length", "eight overlapping blobs", [2, 3, 1, 4, 2, 3, 2, 1]),
]


@pytest.mark.parametrize("case", ENTITY_CASES, ids=[c[0] for c in ENTITY_CASES])
def test_one_entity_call_equals_the_reference(flux, case):
    name, masks_name, lengths = case
    check_entity_call(FLUX, flux, name, masks_name, lengths, divergence=len(lengths) == 2)


def test_cfg_with_the_entities_on_the_negative_branch(flux):
    check_cfg_on_negative(FLUX, flux, PADDED * 2, cfg=3.0)


def test_a_sampling_run_ends_on_the_same_latent(flux):
    check_sampling_run(FLUX, flux, [3, 5], steps=2)  # real length


# 3. Training

def test_a_training_step_equals_the_reference(flux):
    check_training_step(FLUX, flux, PADDED * 2)  # padded, as the reference trains


def test_the_lora_written_for_the_reference_gives_the_same_output(flux, tmp_path, capsys):
    check_lora_roundtrip(FLUX, flux, tmp_path, capsys, PADDED * 2)
