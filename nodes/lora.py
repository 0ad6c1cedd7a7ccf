"""LoRA loader node: any supported EliGen LoRA format onto a MODEL, through ComfyUI's own LoRA machinery."""

import logging

from comfy_api.latest import io

from ..core import host, lora_formats


def load_eligen_lora(model, lora_path, strength, source):
    """Convert the file at ``lora_path`` to ComfyUI form for ``model`` and apply it (a patched clone)."""
    state_dict = lora_formats.load_lora(lora_path)
    found = lora_formats.detect_format(state_dict)
    converted = lora_formats.to_comfy_for_model(state_dict, model, source=source)
    logging.info(f"EliGen LoRA {source}: {found} format, {len(converted)} tensors, strength {strength}")
    return host.weights.apply_lora(model, converted, strength)


class EliGenLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenLoraLoader",
            display_name="EliGen LoRA Loader",
            category="EliGen/lora",
            description="Loads an EliGen LoRA in any released or trained format (ComfyUI, kohya, peft, "
                        "DiffSynth-Studio's internal FLUX names) and names every key the model has no place for.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.1 or Qwen-Image model the LoRA is applied to."),
                io.Combo.Input("lora_name", options=host.files.lora_file_names(),
                               tooltip="The LoRA file in models/loras (safetensors only)."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model; 1.0 is the trained strength."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the LoRA applied.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength):
        if strength == 0:
            return io.NodeOutput(model)
        path = host.files.lora_path(lora_name)
        return io.NodeOutput(load_eligen_lora(model, path, strength, source=lora_name))


NODES = [EliGenLoraLoader]
