"""Bad inputs, table-driven: every case must be refused with a ValueError (or DatasetError) whose message
names the bad item. Cases cover dataset folders and graph datasets, entities, LoRA files, training
settings and outputs, and checkpoints: each case names the bad input and the message it must give."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comfyui_eligen.core import conditioning, lora_formats, mask_rule
from comfyui_eligen.core.conditioning import EntityCondition
from comfyui_eligen.training import checkpoints, dataset, faults, lora, outputs
from comfyui_eligen.training.loop import CheckpointFolder, TrainingData, train
from comfyui_eligen.training.sample import Sample
from comfyui_eligen.training.settings import TrainSettings
from tiny_models import TEXT_WIDTH, tiny_flux

def assert_refused(make, expected):
    """``make()`` raises a ValueError whose message holds every part of ``expected``."""
    with pytest.raises(ValueError) as error:
        make()
    for part in expected:
        assert part in str(error.value), str(error.value)


# ---------------------------------------------------------------------------------------------------
# Dataset folders: each case is (id, records or raw metadata text, files to add, expected substrings)


def make_folder(root, records, extra=None):
    root.mkdir(parents=True, exist_ok=True)
    image = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    Image.fromarray(image).save(root / "a.png")
    Image.fromarray(mask).save(root / "m.png")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(root / "wide_mask.png")
    (root / "notes.txt").write_text("not an image")
    (root / "cut.png").write_bytes((root / "a.png").read_bytes()[:40])
    (root / "sub").mkdir(exist_ok=True)
    for name, action in (extra or {}).items():
        action(root / name)
    text = records if isinstance(records, str) else json.dumps(records)
    (root / "metadata.json").write_text(text)
    return root


def rec(**changes):
    base = {"image": "a.png", "prompt": "p", "eligen_entity_prompts": ["thing"], "eligen_entity_masks": ["m.png"]}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()

FOLDER_CASES = [
    ("nul-in-image-path", [rec(image="a\0.png")], ["record 0", "image path 'a\\x00.png' holds a NUL"]),
    ("nul-in-mask-path", [rec(eligen_entity_masks=["m\0.png"])], ["record 0 (a.png)", "mask 0 path", "NUL"]),
    ("control-char-in-path", [rec(image="a\n.png")], ["record 0", "control character"]),
    ("missing-image-key", [rec(image=DROP)], ["record 0", "missing key 'image'"]),
    ("missing-prompt-key", [rec(prompt=DROP)], ["record 0 (a.png)", "missing key 'prompt'"]),
    ("prompt-not-text", [rec(prompt=5)], ["record 0 (a.png)", "'prompt' must be a string"]),
    ("image-not-text", [rec(image=7)], ["record 0", "'image' must be a non-empty path string"]),
    ("entity-prompts-not-list", [rec(eligen_entity_prompts="x")], ["record 0 (a.png)", "'eligen_entity_prompts' must be a list"]),
    ("entity-masks-not-list", [rec(eligen_entity_masks=5)], ["record 0 (a.png)", "'eligen_entity_masks' must be a list"]),
    ("count-mismatch", [rec(eligen_entity_prompts=["a", "b"])], ["record 0 (a.png)", "2 entity prompts but 1 entity masks"]),
    ("empty-entity-prompt", [rec(eligen_entity_prompts=["  "])], ["record 0 (a.png)", "entity prompt 0 is empty"]),
    ("traversal", [rec(image="../a.png")], ["record 0 (../a.png)", "leaves the dataset folder"]),
    ("absolute", [rec(image="/etc/passwd")], ["record 0 (/etc/passwd)", "is absolute"]),
    ("missing-file", [rec(image="gone.png")], ["record 0 (gone.png)", "image 'gone.png' not found"]),
    ("missing-mask", [rec(eligen_entity_masks=["gone.png"])], ["record 0 (a.png)", "mask 0 'gone.png' not found"]),
    ("not-an-image", [rec(image="notes.txt")], ["record 0 (notes.txt)", "cannot be read as an image"]),
    ("truncated-image", [rec(image="cut.png")], ["record 0 (cut.png)", "cannot be read as an image"]),
    ("folder-as-image", [rec(image="sub")], ["record 0 (sub)", "is not a file"]),
    ("mask-size-mismatch", [rec(eligen_entity_masks=["wide_mask.png"])], ["record 0 (a.png)", "mask 0 'wide_mask.png' is 32x16"]),
    ("record-not-object", [5], ["record 0", "expected an object"]),
    ("metadata-not-list", '{"image": "a.png"}', ["metadata.json", "expected a list of records"]),
    ("metadata-bad-json", '[{"image": "a.png",]', ["metadata.json", "not valid JSON"]),
    ("metadata-empty-list", "[]", ["metadata.json has no records"]),
    ("second-record-named", [rec(), rec(image="gone.png")], ["record 1 (gone.png)"]),
]


@pytest.mark.parametrize("case", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_dataset_folders(tmp_path, case):
    _, records, expected = case
    root = make_folder(tmp_path / "data", records)
    with pytest.raises(dataset.DatasetError) as error:
        dataset.load_dataset(str(root))
    for part in expected:
        assert part in str(error.value), str(error.value)
    dataset.dataset_fingerprint(str(root))  # never raises on the same bad metadata


def test_sixteen_bit_png_images_and_masks_are_read_to_scale(tmp_path):
    """A 16-bit PNG (mode I;16) is read at its real values (it was once read as all white)."""
    grey = np.full((32, 32), 20000, np.uint16)
    grey[:16] = 60000
    Image.fromarray(grey).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I;16")
    image = dataset.read_image(str(tmp_path / "i16.png"))
    assert image.dtype == np.uint8 and int(image[20, 0, 0]) == round(20000 / 257) and int(image[0, 0, 0]) == round(60000 / 257)
    mask = dataset.read_mask(str(tmp_path / "i16.png"))
    assert mask[:16].all() and not mask[16:].any()  # 60000 is white, 20000 (78 of 255) is black


# ---------------------------------------------------------------------------------------------------
# Graph datasets

IMAGES = torch.rand(2, 32, 32, 3)
MASKS = torch.ones(2, 32, 32)


def nan_at(tensor, index):
    out = tensor.clone()
    out.view(-1)[index] = float("nan")
    return out


GRAPH_CASES = [
    ("nan-image", lambda: dataset.dataset_from_images(nan_at(IMAGES, 32 * 32 * 3 + 5), MASKS, "p", "a\nb"),
     ["record 1 (image 1 of the batch)", "NaN or inf"]),
    ("inf-mask", lambda: dataset.dataset_from_images(IMAGES, MASKS.index_fill(0, torch.tensor([1]), float("inf")), "p", "a\nb"),
     ["mask 1 of the batch", "NaN or inf"]),
    ("mask-count", lambda: dataset.dataset_from_images(IMAGES, MASKS[:1], "p", "a\nb"), ["2 entities", "1 masks"]),
    ("mask-size", lambda: dataset.dataset_from_images(IMAGES, torch.ones(2, 16, 32), "p", "a\nb"), ["masks are 32x16", "images are 32x32"]),
    ("prompt-count", lambda: dataset.dataset_from_images(IMAGES, MASKS, "p\nq\nr", "a\nb"), ["prompts: 3 prompts for 2 images"]),
    ("entity-lines", lambda: dataset.dataset_from_images(IMAGES, MASKS, "p", "a\nb\nc"), ["entity_prompts: 3 lines for 2 images"]),
    ("image-shape", lambda: dataset.dataset_from_images(torch.rand(32, 32, 3), None, "p", ""), ["images: expected an IMAGE batch"]),
    ("masks-4d", lambda: dataset.dataset_from_images(IMAGES, torch.ones(1, 2, 32, 32), "p", ""), ["masks: expected a MASK batch"]),
    ("tiny-image", lambda: dataset.dataset_from_images(torch.rand(1, 8, 8, 3), None, "p", ""), ["record 0 (image 0 of the batch)", "below 16 px"]),
]


@pytest.mark.parametrize("case", GRAPH_CASES, ids=[c[0] for c in GRAPH_CASES])
def test_bad_graph_datasets(case):
    _, make, expected = case
    assert_refused(make, expected)


# ---------------------------------------------------------------------------------------------------
# Entities

NAME = 'entity 3 ("red fox")'
EMBEDS = [[torch.randn(1, 4, TEXT_WIDTH), {}]]


def mask_with(value, count=1):
    mask = torch.zeros(1, 16, 16)
    mask[0, :8] = 1.0
    mask.view(-1)[:count] = value
    return mask


def entity(mask_hw=(32, 48), label="e", width=TEXT_WIDTH):
    return conditioning.Entity(torch.randn(1, 3, width), torch.ones(mask_hw), label)


ENTITY_CASES = [
    ("nan-in-mask", lambda: conditioning.entity_mask(mask_with(float("nan")), NAME), [NAME, "1 NaN or inf value(s)"]),
    ("all-nan-mask", lambda: conditioning.entity_mask(torch.full((1, 8, 8), float("nan")), NAME), [NAME, "64 NaN or inf"]),
    ("inf-in-mask", lambda: conditioning.entity_mask(mask_with(float("inf"), 3), NAME), [NAME, "3 NaN or inf"]),
    ("empty-mask", lambda: conditioning.entity_mask(torch.zeros(1, 8, 8), NAME), [NAME, "the mask is empty"]),
    ("mask-batch", lambda: conditioning.entity_mask(torch.ones(2, 8, 8), NAME), [NAME, "holds 2 masks"]),
    ("mask-4d", lambda: conditioning.entity_mask(torch.ones(1, 1, 8, 8), NAME), [NAME, "must be [H, W] or [1, H, W]"]),
    ("nan-conditioning", lambda: conditioning.entity_embeds([[nan_at(torch.randn(1, 4, 8), 3), {}]], NAME), [NAME, "NaN or inf"]),
    ("inf-conditioning", lambda: conditioning.entity_embeds([[torch.full((1, 4, 8), float("inf")), {}]], NAME), [NAME, "NaN or inf"]),
    ("zero-token-conditioning", lambda: conditioning.entity_embeds([[torch.zeros(1, 0, 8), {}]], NAME), [NAME, "0 tokens"]),
    ("two-entry-conditioning", lambda: conditioning.entity_embeds(EMBEDS * 2, NAME), [NAME, "holds 2 entries"]),
    ("2d-conditioning", lambda: conditioning.entity_embeds([[torch.zeros(4, 8), {}]], NAME), [NAME, "expected text embeddings [1, L, D]"]),
    ("too-many", lambda: conditioning.add_entity(tuple(entity(label=str(i)) for i in range(16)), entity(label="x")),
     ['entity 17 ("x")', "at most 16"]),
    ("aspect-within-list", lambda: conditioning.stack_masks((entity(label="a"), entity((32, 32), "b"))),
     ['entity 2 ("b"): mask is 32x32', 'entity 1 ("a") has 48x32']),
    ("aspect-vs-latent", lambda: __import__("comfyui_eligen.core.patch", fromlist=["x"]).check_mask_aspect(
        EntityCondition(torch.ones(1, 1, 64, 64), [2, 3], labels=("sq",)), (8, 16)), ['entity 1 ("sq")', "latent is 16x8"]),
    ("preview-aspect", lambda: __import__("comfyui_eligen.nodes.preview", fromlist=["x"]).overlay_entities(
        torch.zeros(1, 64, 128, 3), [torch.ones(64, 64)], ["wide"]), ['entity 1 ("wide")', "previewed on a 128x64 image"]),
    ("text-width", lambda: conditioning.validate_text_width((entity(label="w", width=16),), EMBEDS, TEXT_WIDTH, "FLUX.1"),
     ['entity 1 ("w")', "16 wide but FLUX.1 expects 32"]),
    ("step-range", lambda: conditioning.apply_entities(EMBEDS, (entity(),), start=0.8, end=0.2), ["start_percent <= end_percent", "0.8"]),
    ("no-entities", lambda: conditioning.apply_entities(EMBEDS, ()), ["no entities given"]),
    ("mask-rule-zero-side", lambda: mask_rule.nearest_indices(0, 4), ["side of 0 pixels"]),
]


@pytest.mark.parametrize("case", ENTITY_CASES, ids=[c[0] for c in ENTITY_CASES])
def test_bad_entities(case):
    _, make, expected = case
    assert_refused(make, expected)


# ---------------------------------------------------------------------------------------------------
# LoRA files (our loader: core/lora_formats.to_comfy_for_model, load_lora)

@pytest.fixture(scope="module")
def flux_model():
    return tiny_flux()


def good_pair():
    prefix = "diffusion_model.double_blocks.0.img_attn.qkv"
    return {prefix + ".lora_up.weight": torch.zeros(192, 2), prefix + ".lora_down.weight": torch.zeros(2, 64),
            prefix + ".alpha": torch.tensor(2.0)}


def changed(**edits):
    sd = good_pair()
    prefix = "diffusion_model.double_blocks.0.img_attn.qkv"
    for suffix, value in edits.items():
        key = prefix + "." + suffix.replace("__", ".")
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


QKV = "diffusion_model.double_blocks.0.img_attn.qkv"
LORA_CASES = [
    ("up-without-down", changed(lora_down__weight=None), [QKV + ".lora_up.weight", "has no lora_down"]),
    ("down-without-up", changed(lora_up__weight=None), [QKV + ".lora_down.weight", "has no lora_up"]),
    ("nan-weight", changed(lora_up__weight=torch.full((192, 2), float("nan"))), [QKV + ".lora_up.weight", "NaN or inf"]),
    ("inf-weight", changed(lora_down__weight=torch.full((2, 64), float("inf"))), [QKV + ".lora_down.weight", "NaN or inf"]),
    ("nan-alpha", changed(alpha=torch.tensor(float("nan"))), [QKV + ".alpha", "NaN or inf"]),
    ("inf-alpha", changed(alpha=torch.tensor(float("inf"))), [QKV + ".alpha", "NaN or inf"]),
    ("alpha-shape", changed(alpha=torch.ones(2)), [QKV + ".alpha", "must be one number"]),
    ("1d-matrix", changed(lora_up__weight=torch.zeros(192)), [QKV + ".lora_up.weight", "must be 2-D"]),
    ("rank-zero", changed(lora_up__weight=torch.zeros(192, 0), lora_down__weight=torch.zeros(0, 64)), [QKV + ".lora_up.weight", "must be 2-D"]),
    ("rank-mismatch", changed(lora_up__weight=torch.zeros(192, 3)), [QKV + ".lora_up.weight", "different ranks"]),
    ("shape-misfit", changed(lora_up__weight=torch.zeros(100, 2)), [QKV, "does not fit the model weight"]),
    ("unknown-module", {"diffusion_model.nowhere.lora_up.weight": torch.zeros(4, 2),
                        "diffusion_model.nowhere.lora_down.weight": torch.zeros(2, 4)}, ["diffusion_model.nowhere.lora_up.weight", "match no module"]),
    ("mid-on-linear", changed(lora_mid__weight=torch.zeros(2, 2)),
     [QKV + ".lora_mid.weight", "4-D lora_up/lora_down, but this module's are 2-D", "IndexError"]),
    ("mid-alone", {QKV + ".lora_mid.weight": torch.zeros(2, 2, 3, 3)}, [QKV + ".lora_mid.weight", "needs its module's lora_up"]),
    ("diff-shape", changed(diff=torch.zeros(3, 4)),
     [QKV + ".diff' has shape (3, 4) but the model's " + QKV + ".weight is (192, 64)", "console warning"]),
    ("diff-shape-other-names", {"double_blocks.0.img_attn.qkv.diff": torch.zeros(192, 63)},
     ["key 'double_blocks.0.img_attn.qkv.diff' has shape (192, 63)", "(192, 64)"]),
    ("diff-bias-shape", changed(diff_b=torch.zeros(5)), [QKV + ".diff_b' has shape (5,)", ".bias is (192,)"]),
    ("dora-scale-size", changed(dora_scale=torch.ones(7, 1)),
     [QKV + ".dora_scale' has 7 values", "192 outputs and 64 inputs"]),
    ("not-a-tensor", dict(good_pair(), extra=[1, 2]), ["'extra'", "holds a list"]),
    ("key-not-text", {5: torch.zeros(1)}, ["key 5 is not text"]),
    ("empty", {}, ["holds no tensors"]),
]


@pytest.mark.parametrize("case", LORA_CASES, ids=[c[0] for c in LORA_CASES])
def test_bad_lora_state_dicts(flux_model, case):
    _, state_dict, expected = case
    with pytest.raises(ValueError) as error:
        lora_formats.to_comfy_for_model(state_dict, flux_model, source="bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors" in message, message
    for part in expected:
        assert part in message, message


def test_good_pair_passes(flux_model):
    assert QKV + ".lora_up.weight" in lora_formats.to_comfy_for_model(good_pair(), flux_model)
    extras = changed(diff=torch.zeros(192, 64), diff_b=torch.zeros(192), dora_scale=torch.ones(192, 1))
    assert QKV + ".diff" in lora_formats.to_comfy_for_model(extras, flux_model)  # extras of the right shape load


LORA_FILE_CASES = [
    ("pickle-extension", "x.pt", lambda p: p.write_bytes(b"\x80\x04"), ["'x.pt'", "only safetensors are loaded"]),
    ("corrupt", "x.safetensors", lambda p: p.write_bytes(b"garbage" * 10), ["'x.safetensors'", "not a valid safetensors"]),
    ("missing", "gone.safetensors", lambda p: None, ["'gone.safetensors'", "does not exist"]),
]


@pytest.mark.parametrize("case", LORA_FILE_CASES, ids=[c[0] for c in LORA_FILE_CASES])
def test_bad_lora_files(tmp_path, case):
    _, name, make, expected = case
    make(tmp_path / name)
    with pytest.raises(ValueError) as error:
        lora_formats.load_lora(str(tmp_path / name))
    for part in expected:
        assert part in str(error.value), str(error.value)


# ---------------------------------------------------------------------------------------------------
# Training settings, outputs and inputs

SETTINGS_CASES = [
    ("steps-0", dict(steps=0), "steps must be at least 1"),
    ("batch-0", dict(batch_size=0), "batch_size must be at least 1"),
    ("lr-nan", dict(learning_rate=float("nan")), "learning_rate must be a positive number"),
    ("lr-negative", dict(learning_rate=-1.0), "learning_rate must be a positive number"),
    ("decay-inf", dict(weight_decay=float("inf")), "weight_decay must be a finite number"),
    ("dropout-1", dict(entity_dropout=1.0), "entity_dropout must be in [0, 1)"),
    ("schedule", dict(schedule="zigzag"), "schedule 'zigzag' is not one of"),
    ("precision", dict(precision="fp8"), "precision 'fp8' is not one of"),
    ("warmup-negative", dict(warmup_steps=-1), "warmup_steps must not be negative"),
]


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_bad_training_settings(case):
    _, changes, expected = case
    with pytest.raises(ValueError, match="training settings") as error:
        TrainSettings(**changes).validate()
    assert expected in str(error.value)


LORA_SETTINGS_CASES = [
    ("alpha-inf", dict(alpha=float("inf")), "alpha must be a positive finite number (got inf)"),
    ("alpha-nan", dict(alpha=float("nan")), "alpha must be a positive finite number (got nan)"),
    ("rank-0", dict(rank=0), "rank must be at least 1"),
    ("custom-empty", dict(preset="custom", custom_pattern=""), "needs a custom_pattern"),
    ("custom-bad-regex", dict(preset="custom", custom_pattern="(["), "is not a valid regex"),
]


@pytest.mark.parametrize("case", LORA_SETTINGS_CASES, ids=[c[0] for c in LORA_SETTINGS_CASES])
def test_bad_lora_settings(case):
    _, changes, expected = case
    with pytest.raises(ValueError, match="LoRA settings") as error:
        lora.LoraSettings(**changes).validate()
    assert expected in str(error.value)


NAME_CASES = [
    ("name-250", "n" * 250, "250 characters long"),
    ("name-300", "n" * 300, "300 characters long"),
    ("name-nul", "lo\0ra", "NUL or another control character"),
    ("name-reserved", "aux", "reserved device name"),
    ("name-separator", "a\\b", "no folders"),
    ("name-dot", ".x", "starting with a dot"),
    ("name-trailing-dot", "x.", "ends with a dot"),
    ("name-not-text", 5, "must be text"),
]


@pytest.mark.parametrize("case", NAME_CASES, ids=[c[0] for c in NAME_CASES])
def test_bad_output_names(tmp_path, case):
    _, name, expected = case
    with pytest.raises(ValueError, match="lora_name") as error:
        outputs.prepare_outputs(name, outputs.node_folders(name, str(tmp_path / "loras"), str(tmp_path / "output")))
    assert expected in str(error.value)
    runs = tmp_path / "output" / outputs.RUNS_FOLDER
    assert not runs.exists() or os.listdir(runs) == []


def sample(**changes):
    parts = dict(latent=torch.randn(16, 4, 4), context=torch.randn(1, 3, TEXT_WIDTH), pooled=torch.randn(1, TEXT_WIDTH),
                 entity_embeds=[torch.randn(1, 2, TEXT_WIDTH)], masks=torch.ones(1, 32, 32))
    parts.update(changes)
    return Sample(**parts)


TRAINING_INPUT_CASES = [
    ("nan-latent", lambda: faults.check_finite_samples([sample(), sample(latent=torch.full((16, 4, 4), float("nan")))]),
     ["training sample 1", "latent"]),
    ("inf-entity-embeds", lambda: faults.check_finite_samples([sample(entity_embeds=[torch.full((1, 2, TEXT_WIDTH), float("inf"))])]),
     ["training sample 0", "entity 1 embeddings"]),
    ("nan-pooled", lambda: faults.check_finite_samples([sample(pooled=torch.full((1, TEXT_WIDTH), float("nan")))]),
     ["training sample 0", "pooled prompt embedding"]),
    ("huge-entity-embeds", lambda: faults.check_finite_samples([sample(), sample(entity_embeds=[torch.full((1, 2, TEXT_WIDTH), 1e6)])]),
     ["training sample 1", "entity 1 embeddings hold values as large as 1e+06", "far below 65504"]),
    ("validation-positive-width", lambda: faults.check_validation_inputs(sample(), [[torch.zeros(1, 3, 16), {}]], None, TEXT_WIDTH),
     ["validation_positive", "16 wide", "32"]),
    ("validation-entity-aspect", lambda: faults.check_validation_inputs(sample(), None, [entity((32, 64), "wide")], TEXT_WIDTH),
     ["validation_entities", 'entity 1 ("wide")', "mask is 64x32"]),
    ("validation-entity-width", lambda: faults.check_validation_inputs(sample(), None, [entity((32, 32), "w", 16)], TEXT_WIDTH),
     ["validation_entities", 'entity 1 ("w")', "16 wide"]),
]


@pytest.mark.parametrize("case", TRAINING_INPUT_CASES, ids=[c[0] for c in TRAINING_INPUT_CASES])
def test_bad_training_inputs(case):
    _, make, expected = case
    assert_refused(make, expected)


# ---------------------------------------------------------------------------------------------------
# Checkpoints

META = {"step": 1, "info": {"family": "flux", "lora": lora.LoraSettings(rank=2, alpha=2, preset="eligen").to_dict()},
        "optimizer": {"param_groups": [], "scalars": {}}, "scheduler": None}


def checkpoint_file(folder, meta=META, tensors=None, name="step_000001.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    metadata = None if meta is None else {checkpoints.METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)}
    save_file(tensors or {"lora.x": torch.zeros(1)}, str(path), metadata=metadata)
    return str(path)


def with_lora(**changes):
    return dict(META, info=dict(META["info"], lora=dict(META["info"]["lora"], **changes)))


CHECKPOINT_CASES = [
    ("metadata-not-json", lambda d: checkpoints.Checkpoint(checkpoint_file(d, "{oops")), ["step_000001", "not valid JSON"]),
    ("metadata-no-step", lambda d: checkpoints.Checkpoint(checkpoint_file(d, {k: v for k, v in META.items() if k != "step"})),
     ["step_000001", "lacks 'step'"]),
    ("metadata-missing", lambda d: checkpoints.Checkpoint(checkpoint_file(d, None)), ["step_000001", "not an EliGen checkpoint"]),
    ("nan-tensor", lambda d: checkpoints.Checkpoint(checkpoint_file(d, tensors={"lora.x": torch.tensor([float("nan")])})),
     ["step_000001", "'lora.x' holds NaN or inf"]),
    ("not-safetensors", lambda d: (d.mkdir(), (d / "step_000001.safetensors").write_bytes(b"junk"),
                                   checkpoints.Checkpoint(str(d / "step_000001.safetensors"))), ["step_000001", "cannot be read"]),
    ("pointer-garbage", lambda d: (d.mkdir(), (d / "latest.json").write_text("{x"), checkpoints.latest_checkpoint(str(d))),
     ["latest.json is damaged"]),
    ("pointer-missing-file", lambda d: (d.mkdir(), (d / "latest.json").write_text('{"checkpoint": "step_000009.safetensors"}'),
                                        checkpoints.latest_checkpoint(str(d))), ["step_000009.safetensors does not exist"]),
    ("pointer-traversal", lambda d: (d.mkdir(), (d / "latest.json").write_text('{"checkpoint": "../x.safetensors"}'),
                                     checkpoints.latest_checkpoint(str(d))), ["'../x.safetensors' is not of the form"]),
    ("resume-other-alpha", lambda d: checkpoints.Checkpoint(checkpoint_file(d, with_lora(alpha=8.0))).check_lora_settings(
        lora.LoraSettings(rank=2, alpha=2, preset="eligen")), ["alpha 8.0 in the checkpoint, 2 now"]),
    ("resume-other-rank", lambda d: checkpoints.Checkpoint(checkpoint_file(d, with_lora(rank=4))).check_lora_settings(
        lora.LoraSettings(rank=2, alpha=2, preset="eligen")), ["rank 4 in the checkpoint, 2 now"]),
    ("resume-other-targets", lambda d: checkpoints.Checkpoint(checkpoint_file(d, with_lora(preset="all_block_linears"))).check_lora_settings(
        lora.LoraSettings(rank=2, alpha=2, preset="eligen")), ["preset 'all_block_linears' in the checkpoint, 'eligen' now"]),
    ("resume-no-settings", lambda d: checkpoints.Checkpoint(checkpoint_file(d, dict(META, info={}))).check_lora_settings(
        lora.LoraSettings()), ["does not record its LoRA settings"]),
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoints(tmp_path, case):
    _, make, expected = case
    assert_refused(lambda: make(tmp_path / "run"), expected)


def test_resume_with_another_alpha_is_refused_before_training(tmp_path):
    """Resuming with a different alpha is refused (it would silently rescale the update)."""
    samples = [sample(), sample()]
    settings = lora.LoraSettings(rank=2, alpha=2, preset="eligen")
    train(tiny_flux(), TrainingData(samples), settings, TrainSettings(steps=1), CheckpointFolder(str(tmp_path)))
    with pytest.raises(ValueError, match=r"alpha 2 in the checkpoint, 4 now"):
        train(tiny_flux(), TrainingData(samples), lora.LoraSettings(rank=2, alpha=4, preset="eligen"),
              TrainSettings(steps=2), CheckpointFolder(str(tmp_path), "latest"))


def test_the_suite_has_at_least_80_cases():
    tables = [FOLDER_CASES, GRAPH_CASES, ENTITY_CASES, LORA_CASES, LORA_FILE_CASES, SETTINGS_CASES,
              LORA_SETTINGS_CASES, NAME_CASES, TRAINING_INPUT_CASES, CHECKPOINT_CASES]
    assert sum(len(t) for t in tables) >= 80
