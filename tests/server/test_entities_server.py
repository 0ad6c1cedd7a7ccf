"""Entity sampling end to end on a real ComfyUI server: toy FLUX.1 and toy Qwen-Image models, stock
text encode / mask / latent / sampler / decode nodes, with and without a negative prompt, batch 2, two
resolutions with one entity list, and KSampler, KSamplerAdvanced and SamplerCustomAdvanced."""

import numpy as np
import pytest
from PIL import Image

from comfy_server import ServerError

pytestmark = pytest.mark.server

STEPS = 2


def entity_graph(family, mask_size=(96, 64)):
    """Nodes shared by the graphs below: toy models, prompts, two entities, two EliGen Apply nodes."""
    width, height = mask_size
    return {
        "models": {"class_type": "EliGenToyModelLoader", "inputs": {"family": family, "weights": "random", "seed": 0}},
        "global": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1],
                                                               "text": "a red circle and a blue square"}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": "green"}},
        "blue_text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["models", 1], "text": "blue square"}},
        "empty": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": width, "height": height}},
        "box_a": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 2, "height": height // 2}},
        "box_b": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": width // 3, "height": height // 2}},
        "mask_a": {"class_type": "MaskComposite", "inputs": {"destination": ["empty", 0], "source": ["box_a", 0],
                                                              "x": 0, "y": 0, "operation": "add"}},
        "mask_b": {"class_type": "MaskComposite", "inputs": {"destination": ["empty", 0], "source": ["box_b", 0],
                                                              "x": width // 2, "y": height // 2, "operation": "add"}},
        "red": {"class_type": "EliGenEntity", "inputs": {"mask": ["mask_a", 0], "clip": ["models", 1],
                                                          "text": "red circle", "text_length": "real_length"}},
        "blue": {"class_type": "EliGenEntity", "inputs": {"mask": ["mask_b", 0], "conditioning": ["blue_text", 0],
                                                           "label": "blue square", "previous": ["red", 0]}},
        "with_negative": {"class_type": "EliGenApply", "inputs": {
            "model": ["models", 0], "positive": ["global", 0], "entities": ["blue", 0], "negative": ["negative", 0],
            "entities_on_negative": False, "start_percent": 0.0, "end_percent": 1.0}},
        "without_negative": {"class_type": "EliGenApply", "inputs": {
            "model": ["models", 0], "positive": ["global", 0], "entities": ["blue", 0],
            "entities_on_negative": True}},
    }


def add_sampled_image(graph, name, sampler_node, vae=("models", 2)):
    graph[name] = sampler_node
    graph[name + "_image"] = {"class_type": "VAEDecode", "inputs": {"samples": [name, 0], "vae": list(vae)}}
    graph[name + "_save"] = {"class_type": "SaveImage", "inputs": {"images": [name + "_image", 0],
                                                                    "filename_prefix": name}}


def ksampler(model, positive, negative, latent, cfg=2.0):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": negative, "latent_image": latent, "seed": 7,
        "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}


def full_graph(family):
    graph = entity_graph(family)
    graph["small"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 96, "height": 64, "batch_size": 2}}
    graph["large"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 144, "height": 96, "batch_size": 2}}
    for size in ("small", "large"):
        add_sampled_image(graph, f"neg_{size}", ksampler(["with_negative", 0], ["with_negative", 1],
                                                          ["with_negative", 2], [size, 0]))
        add_sampled_image(graph, f"noneg_{size}", ksampler(["without_negative", 0], ["without_negative", 1],
                                                            ["without_negative", 2], [size, 0]))
    add_sampled_image(graph, "plain_small", ksampler(["models", 0], ["global", 0], ["negative", 0], ["small", 0]))
    add_sampled_image(graph, "advanced", {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["with_negative", 0], "positive": ["with_negative", 1], "negative": ["with_negative", 2],
        "latent_image": ["large", 0], "add_noise": "enable", "noise_seed": 3, "steps": STEPS, "cfg": 2.0,
        "sampler_name": "euler", "scheduler": "simple", "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}})
    graph["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}
    graph["guider"] = {"class_type": "CFGGuider", "inputs": {
        "model": ["with_negative", 0], "positive": ["with_negative", 1], "negative": ["with_negative", 2], "cfg": 2.0}}
    graph["sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    graph["sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["with_negative", 0], "scheduler": "simple", "steps": STEPS, "denoise": 1.0}}
    add_sampled_image(graph, "custom", {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["small", 0]}})
    return graph


def images_by_prefix(server, entry):
    found = {}
    for path in server.output_files(entry):
        prefix = path.rsplit("/", 1)[-1].rsplit("_", 2)[0]
        found.setdefault(prefix, []).append(np.asarray(Image.open(path), dtype=np.float32))
    return found


@pytest.mark.parametrize("family", ["flux", "qwen_image"])
def test_entities_sample_through_the_stock_samplers(comfy_server, family):
    entry = comfy_server.run_workflow(full_graph(family))
    images = images_by_prefix(comfy_server, entry)
    sizes = {"neg_small": (64, 96), "noneg_small": (64, 96), "neg_large": (96, 144), "noneg_large": (96, 144),
             "plain_small": (64, 96), "advanced": (96, 144), "custom": (64, 96)}
    for name, (height, width) in sizes.items():
        assert len(images[name]) == 2, name  # batch 2
        assert all(image.shape[:2] == (height, width) for image in images[name]), name
    # entity control changes the picture (same seed, same prompts, entities on vs off)
    assert np.abs(images["neg_small"][0] - images["plain_small"][0]).max() > 0
    # the negative matters: a real negative vs the zeroed one (entities on the negative there)
    assert np.abs(images["neg_small"][0] - images["noneg_small"][0]).max() > 0


def test_mask_of_another_aspect_fails_the_prompt_naming_the_entity(comfy_server):
    graph = entity_graph("flux", mask_size=(64, 64))
    graph["latent"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}}
    add_sampled_image(graph, "wrong", ksampler(["with_negative", 0], ["with_negative", 1], ["with_negative", 2],
                                               ["latent", 0]))
    with pytest.raises(ServerError) as error:
        comfy_server.run_workflow(graph)
    message = str(error.value)
    assert 'entity 1 ("red circle")' in message and 'entity 2 ("blue square")' in message
    assert "aspect 1.000" in message and "aspect 2.000" in message
    # raised inside KSampler: the message itself says it is EliGen's, with the size the user typed
    assert "EliGen Apply: the entity masks do not fit the image being sampled" in message
    assert "mask is 64x64 (aspect 1.000) but the image being sampled is 128x64 pixels (its latent is 16x8" in message


def test_entity_node_errors_reach_the_user(comfy_server):
    graph = entity_graph("flux")
    graph["empty_mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 96, "height": 64}}
    graph["blue"]["inputs"]["mask"] = ["empty_mask", 0]
    graph["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["with_negative", 1]}}
    with pytest.raises(ServerError, match=r'entity 2 \(\\?"blue square\\?"\): the mask is empty'):
        comfy_server.run_workflow(graph)
