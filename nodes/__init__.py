"""Node definitions (comfy_api.latest schema style). Every node module lists its classes in NODES."""

from comfy_api.latest import ComfyExtension

from . import entities, lora, toyworld, training

NODE_MODULES = (entities, lora, training, toyworld)


class EliGenExtension(ComfyExtension):
    async def get_node_list(self):
        return [node for module in NODE_MODULES for node in module.NODES]
