"""EliGen Preview Entities in a real ComfyUI: the picture reaches the UI and the saved image."""

import os

import numpy as np
from PIL import Image

from comfyui_eligen.nodes import preview


def test_preview_node_in_a_real_server(comfy_server):
    """Real entities from EliGen Entity nodes, drawn on a stock EmptyImage; the UI gets the picture."""
    graph = {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}},
        "2": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "4": {"class_type": "MaskComposite", "inputs": {"destination": ["2", 0], "source": ["3", 0], "x": 32, "y": 0,
                                                        "operation": "add"}},
        "5": {"class_type": "EliGenEntity", "inputs": {"mask": ["4", 0], "clip": ["1", 1], "text": "red circle",
                                                       "label": "red circle"}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x808080}},
        "7": {"class_type": "EliGenPreviewEntities", "inputs": {"image": ["6", 0], "entities": ["5", 0],
                                                               "opacity": 0.5, "labels": False}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "eligen_preview"}},
    }
    entry = comfy_server.run_workflow(graph)
    (shown,) = entry["outputs"]["7"]["images"]  # the preview the UI shows on the node
    assert shown["type"] == "temp" and shown["filename"].endswith(".png")
    (path,) = [p for p in comfy_server.output_files(entry) if "eligen_preview" in os.path.basename(p)]
    picture = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    assert picture.shape == (128, 128, 3)
    red = np.array(preview.PALETTE[0])
    # The mask (top-right quarter at 64 px) lands on the top-right quarter of the 128 px image.
    assert np.allclose(picture[30, 100], 0.5 * (128 / 255) + 0.5 * red, atol=2 / 255)
    assert np.allclose(picture[100, 30], 128 / 255, atol=1 / 255)
