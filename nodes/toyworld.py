"""Toy world nodes: tiny models that run the whole EliGen job on a CPU, layouts and a placement metric."""

from comfy_api.latest import io

from ..toyworld import models

CATEGORY = "EliGen/toy world"


class EliGenToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenToyModelLoader",
            display_name="EliGen Toy Model Loader",
            category=CATEGORY,
            description="Tiny FLUX or Qwen-Image model, toy text encoder and toy VAE built from ComfyUI's "
            "own classes; the stock text-encode, sampler and VAE nodes work on them.",
            inputs=[
                io.Combo.Input("family", options=sorted(models.FAMILIES), default="flux",
                               tooltip="Architecture of the tiny diffusion model."),
                io.Combo.Input("weights", options=["pretrained", "random"], default="pretrained",
                               tooltip="pretrained: the shipped base model (trained on global captions only); "
                               "random: a fresh deterministic initialisation from the seed."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random initialisation (ignored for pretrained weights)."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family, weights, seed) -> io.NodeOutput:
        return io.NodeOutput(*models.load_toy_models(family, weights, seed))


NODES = [EliGenToyModelLoader]
