"""ComfyUI-EliGen: entity-level controlled generation (EliGen) for ComfyUI.

ComfyUI imports this file from ``custom_nodes/``. Node modules (and with them torch and comfy) are
imported only when ComfyUI asks for the node list, so the plain library code in ``core/``,
``training/`` and ``toyworld/`` can be imported by tests and scripts without a server.
"""

# Served to the page as /extensions/<this folder>/: fresh LoRA lists after training, template order.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import EliGenExtension

    return EliGenExtension()
