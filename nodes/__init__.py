"""Node definitions (comfy_api.latest schema style). Every node module lists its classes in NODES."""

from comfy_api.latest import ComfyExtension

from ..core import host
from ..toyworld.example_inputs import provide_example_inputs
from ..training import peft_requirement
from . import dataset, entities, layouts, lora, preview, toyworld, training

NODE_MODULES = (entities, layouts, preview, lora, dataset, training, toyworld)


class EliGenExtension(ComfyExtension):
    async def get_node_list(self):
        if not host.startup_report():  # one log line when this ComfyUI lacks something EliGen needs
            provide_example_inputs(host.files.input_directory())  # the painted-layout template's picture
        peft_requirement.startup_report()  # one log line when training cannot run for want of peft
        return [node for module in NODE_MODULES for node in module.NODES]
