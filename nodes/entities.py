"""Entity nodes: define entities (a prompt and a mask each) and apply them to a model and prompt."""

import torch
from comfy_api.latest import io

from ..core import conditioning as entity_conds  # (a node input is named "conditioning")
from ..core.adapters import adapter_for
from ..core.patch import patch_model

CATEGORY = "EliGen/entities"
Entities = io.Custom("ELIGEN_ENTITIES")


class EliGenEntity(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenEntity",
            display_name="EliGen Entity",
            category=CATEGORY,
            description="One entity: a prompt and the mask where it must appear. Chain entities through "
            "'previous' (order is kept; up to 16).",
            inputs=[
                io.Mask.Input("mask", tooltip="Where the entity goes: white = entity. Any resolution, but the "
                              "image's aspect ratio. One mask per entity."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The entity prompt, encoded by a stock CLIP Text Encode with the "
                                      "model's text encoder. Leave empty to use clip + text instead."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Text encoder for 'text' (used when no conditioning is connected)."),
                io.String.Input("text", multiline=True, default="", optional=True,
                                tooltip="The entity prompt, encoded with 'clip'."),
                io.Combo.Input("text_length", options=list(entity_conds.TEXT_LENGTHS), default="padded_512",
                               optional=True,
                               tooltip="FLUX T5 length for 'text': padded_512 = what the released EliGen "
                               "adapter saw; real_length = no padding, less attention work. "
                               "Qwen-Image prompts are never padded."),
                io.String.Input("label", default="", optional=True,
                                tooltip="Name used in messages and previews (default: the text)."),
                Entities.Input("previous", optional=True, tooltip="Entities defined before this one."),
            ],
            outputs=[Entities.Output(display_name="entities")],
        )

    @classmethod
    def execute(cls, mask, conditioning=None, clip=None, text="", text_length="padded_512", label="",
                previous=None) -> io.NodeOutput:
        index = len(previous or ())
        label = (label or "").strip() or (text or "").strip() or f"entity {index + 1}"
        name = entity_conds.describe(index, label)
        if conditioning is not None and clip is not None:
            raise ValueError(f"{name}: connect either a conditioning or a clip (with text), not both")
        if conditioning is not None:
            embeds = entity_conds.entity_embeds(conditioning, name)
        elif clip is not None:
            if not (text or "").strip():
                raise ValueError(f"{name}: the text is empty")
            embeds = entity_conds.encode_entity_text(clip, text, text_length, name)
        else:
            raise ValueError(f"{name}: connect a conditioning, or a clip and a text")
        entity = entity_conds.Entity(embeds, entity_conds.entity_mask(mask, name), label)
        return io.NodeOutput(entity_conds.add_entity(previous, entity))


class EliGenApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenApply",
            display_name="EliGen Apply",
            category=CATEGORY,
            description="Applies entities to the model and the prompt: each entity's prompt only reaches the "
            "image inside its mask. Works with the stock KSampler, KSamplerAdvanced and SamplerCustomAdvanced.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 or Qwen-Image, ideally with the EliGen LoRA loaded."),
                io.Conditioning.Input("positive", tooltip="The global prompt."),
                Entities.Input("entities", tooltip="The entities, from EliGen Entity."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt (passed through unless entities_on_negative). "
                                      "Without one, the output negative is the zeroed positive."),
                io.Boolean.Input("entities_on_negative", default=False, optional=True,
                                 tooltip="Also apply the entity masks on the negative branch (the reference's "
                                 "option: the negative prompt fills every entity slot)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Entity control starts at this fraction of the sampling (ComfyUI's "
                               "start_percent meaning). Outside the range the global prompt acts alone."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Entity control ends at this fraction of the sampling."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
        )

    @classmethod
    def execute(cls, model, positive, entities, negative=None, entities_on_negative=False, start_percent=0.0,
                end_percent=1.0) -> io.NodeOutput:
        adapter = adapter_for(model)
        width = adapter.context_dim(model.model.diffusion_model)
        what = f"this {adapter.display_name} model"
        entity_conds.validate_text_width(entities, positive, width, what)
        if negative is None:
            negative = [[torch.zeros_like(tensor), _zeroed_options(options)] for tensor, options in positive]
        else:
            entity_conds.validate_text_width((), negative, width, what)
        positive, negative = entity_conds.apply_entities(
            positive, entities, negative, on_negative=entities_on_negative, start=start_percent, end=end_percent)
        return io.NodeOutput(patch_model(model), positive, negative)


def _zeroed_options(options):
    # As the stock ConditioningZeroOut: a zero pooled vector, no other extras.
    pooled = options.get("pooled_output")
    return {} if pooled is None else {"pooled_output": torch.zeros_like(pooled)}


NODES = [EliGenEntity, EliGenApply]
