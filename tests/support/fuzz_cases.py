"""Random inputs for the package's entry points, shared by the hypothesis tests (tests/unit/test_reliability_fuzz.py)
and scripts/fuzz.py. Each ``*_case(rng, ...)`` builds one hostile input from a ``random.Random`` and feeds
it to the real function; the only exceptions allowed out are ValueError and its subclasses (the
package's named errors). Successful calls are checked for what they promise.
"""

import json
import math
import os
import random

import numpy as np
import torch
from PIL import Image

from comfyui_eligen.core import attention, conditioning, lora_formats, mask_rule, patch
from comfyui_eligen.training import dataset

EXPECTED = (ValueError,)
HOSTILE_TEXT = ["", " ", "a.png", "m.png", "../a.png", "/abs.png", "a\0.png", "sub", "missing.png", "ä.png",
                "a" * 300, "C:\\x.png", "m.png\n", ".", "notes.txt", "%s", "{}", "m.png/"]
HOSTILE_VALUES = [None, 0, -1, 3.5, float("nan"), True, [], {}, [None], ["x", 5], {"a": 1}, "x" * 5]


def _value(rng, depth=0):
    roll = rng.random()
    if roll < 0.45:
        return rng.choice(HOSTILE_TEXT)
    if roll < 0.75 or depth > 1:
        return rng.choice(HOSTILE_VALUES)
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


# ---- mask building ------------------------------------------------------------------------------

def _mask(rng, base_hw, clean=False):
    if clean:
        scale = rng.choice([0.5, 1, 2, 3, 8])
        mask = torch.zeros(max(1, round(base_hw[0] * scale)), max(1, round(base_hw[1] * scale)))
        mask.view(-1)[rng.randrange(mask.numel())] = 1.0
        return mask + (torch.rand(mask.shape) < 0.3).float()
    if rng.random() < 0.7:  # the case's aspect at another resolution
        scale = rng.choice([0.5, 1, 1, 2, 3])
        h, w = max(1, round(base_hw[0] * scale)), max(1, round(base_hw[1] * scale))
    else:
        h, w = rng.randint(0, 40), rng.randint(0, 40)
    shape = rng.choice([(h, w)] * 4 + [(1, h, w), (rng.randint(0, 3), h, w), (1, 1, h, w), (h,)])
    mask = torch.from_numpy(np.random.default_rng(rng.getrandbits(32)).random(shape, dtype=np.float32))
    kind = rng.random()
    if kind < 0.15 and mask.numel():
        mask.view(-1)[rng.randrange(mask.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    elif kind < 0.25:
        mask = mask * 0
    elif kind < 0.35:
        mask = mask * 300 - 100
    return mask


def mask_case(rng):
    """Entity masks -> EliGen Entity checks -> apply_entities -> the token grid at a random latent."""
    entities = []
    base_hw = (rng.randint(1, 24), rng.randint(1, 24))
    clean = rng.random() < 0.5  # half the cases are valid layouts, so the success path is fuzzed too
    for k in range(rng.randint(1, 4)):
        embeds = torch.randn(1, 3 if clean else rng.choice([0, 1, 3, 3, 3]), 8)
        if not clean and rng.random() < 0.1 and embeds.shape[1]:
            embeds[0, 0, 0] = float("nan")
        name = conditioning.describe(k, f"e{k}")
        mask = conditioning.entity_mask(_mask(rng, base_hw, clean), name)
        embeds = conditioning.entity_embeds([[embeds, {}]], name)
        entities.append(conditioning.Entity(embeds, mask, f"e{k}"))
    positive = [[torch.randn(1, 2, 8), {}]]
    applied, _ = conditioning.apply_entities(positive, entities)
    condition = applied[0][1]["model_conds"][conditioning.MODEL_CONDS_KEY]
    latent_hw = base_hw if clean or rng.random() < 0.7 else (rng.randint(1, 24), rng.randint(1, 24))
    patch.check_mask_aspect(condition, latent_hw)
    grid = attention.mask_to_token_grid(condition.masks, latent_hw, 2, condition.mask_sizes)
    assert grid.shape[-2:] == (math.ceil(latent_hw[0] / 2), math.ceil(latent_hw[1] / 2)), grid.shape
    for k, entity in enumerate(entities):  # every mask read with PIL's own NEAREST from its own size
        u8 = (entity.mask.numpy() > 0.5).astype(np.uint8) * 255
        latent = np.asarray(Image.fromarray(u8).resize(latent_hw[::-1], Image.NEAREST)) > 127
        assert np.array_equal(mask_rule.masks_to_latent(entity.mask[None], latent_hw)[0].numpy(), latent)


# ---- dataset records ----------------------------------------------------------------------------

def make_dataset_folder(folder):
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(folder, "a.png"))
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(os.path.join(folder, "m.png"))
    with open(os.path.join(folder, "notes.txt"), "w") as handle:
        handle.write("text")
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)


def _record(rng):
    if rng.random() < 0.1:
        return _value(rng)
    if rng.random() < 0.4:
        count = rng.randint(0, 2)
        return {"image": "a.png", "prompt": "a prompt", "eligen_entity_prompts": ["thing"] * count,
                "eligen_entity_masks": ["m.png"] * count}
    record = {}
    for key in ("image", "prompt", "eligen_entity_prompts", "eligen_entity_masks"):
        roll = rng.random()
        if roll < 0.15:
            continue
        if key == "image":
            record[key] = rng.choice(["a.png"] * 3 + HOSTILE_TEXT) if roll < 0.8 else _value(rng)
        elif key == "prompt":
            record[key] = "a prompt" if roll < 0.7 else _value(rng)
        elif key == "eligen_entity_prompts":
            record[key] = ["thing"] * rng.randint(0, 2) if roll < 0.6 else _value(rng)
        else:
            record[key] = [rng.choice(["m.png"] * 3 + HOSTILE_TEXT) for _ in range(rng.randint(0, 2))] if roll < 0.6 else _value(rng)
    if rng.random() < 0.1:
        record[rng.choice(["extra", "", "\0"])] = _value(rng)
    return record


def dataset_case(rng, folder):
    """Random metadata in a folder with real files -> load_dataset (named errors only) and
    dataset_fingerprint (never fails)."""
    records = [_record(rng) for _ in range(rng.randint(0, 3))]
    roll = rng.random()
    path = os.path.join(folder, "metadata.json")
    with open(path, "w", encoding="utf-8") as handle:
        if roll < 0.05:
            handle.write(json.dumps(records)[: rng.randint(0, 20)])
        elif roll < 0.1:
            handle.write(json.dumps(_value(rng)))
        else:
            handle.write(json.dumps(records))
    dataset.dataset_fingerprint(folder)
    loaded = dataset.load_dataset(folder, max_pixels=rng.choice([256, 1024, 1 << 20]))
    for i, record in enumerate(loaded.records):
        image, masks = dataset.prepare_image(record, loaded.bucket_of(i)), dataset.prepare_masks(record, loaded.bucket_of(i))
        assert image.shape[-2:] == masks.shape[-2:] == loaded.bucket_of(i)


# ---- LoRA key conversion ------------------------------------------------------------------------

MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1", "final_layer.linear",
           "nowhere", "double_blocks.9.img_attn.qkv", ""]
PREFIXES = ["diffusion_model.", "lora_unet_", "", "base_model.model.", "transformer.", "blocks.0.", "single_blocks.0."]
SUFFIXES = [".lora_up.weight", ".lora_down.weight", ".alpha", ".lora_A.weight", ".lora_B.default.weight",
            ".lora_A.default.weight", ".lora.up.weight", ".dora_scale", ".lora_mid.weight", ".diff", ".diff_b", ".weight", ""]


def _tensor(rng):
    shape = [rng.choice([0, 1, 2, 3, 64, 192]) for _ in range(rng.choice([0, 1, 2, 2, 2, 3, 4]))]
    while math.prod(shape) > 50_000:  # keep cases small: the point is shapes, not memory
        shape[shape.index(max(shape))] = 3
    shape = tuple(shape)
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.int64, torch.bool])
    tensor = torch.zeros(shape, dtype=dtype)
    if tensor.is_floating_point() and tensor.numel() and rng.random() < 0.2:
        tensor.view(-1)[0] = rng.choice([float("nan"), float("inf")])
    return tensor


def lora_case(rng, model):
    state_dict = {}
    for _ in range(rng.randint(0, 6) if rng.random() < 0.7 else 0):
        module = rng.choice(MODULES)
        prefix = rng.choice(PREFIXES)
        name = prefix + (module.replace(".", "_") if prefix == "lora_unet_" else module)
        key = name + rng.choice(SUFFIXES) if rng.random() < 0.95 else rng.choice([5, None, ("a",)])
        value = _tensor(rng) if rng.random() < 0.95 else rng.choice([[1], "x", None, 3])
        state_dict[key] = value
    if not state_dict or rng.random() < 0.5:  # real pairs too, so conversions also succeed
        up = "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"
        state_dict[up] = torch.zeros(192, 2)
        state_dict[up.replace("lora_up", "lora_down")] = torch.zeros(2, 64)
    converted = lora_formats.to_comfy_for_model(state_dict, model, source="fuzz.safetensors")
    assert converted and all(isinstance(v, torch.Tensor) for v in converted.values())


TARGETS = ("masks", "dataset_records", "lora_keys")


def run_one(target, rng, folder, model):
    """Run one case; returns None, or the exception it raised."""
    try:
        if target == "masks":
            mask_case(rng)
        elif target == "dataset_records":
            dataset_case(rng, folder)
        else:
            lora_case(rng, model)
    except Exception as error:  # counted by the caller; only EXPECTED types are allowed
        return error
    return None


def case_rng(seed, index):
    return random.Random(f"{seed}:{index}")
