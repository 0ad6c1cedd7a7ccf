"""The example workflows as the template browser shows them, checked on the files: the frontends title
and describe a pack's template card by its file name and ask for <name>.jpg beside it, and the page
extension (web/) orders the cards by the number in the name. So: every template has a small JPEG
thumbnail with a picture in it, names are numbered without gaps and read as titles, a template that
loads the toy LoRA comes after the one that trains it and says so, and every note that promises a
time says what was measured, on what and when."""

import glob
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from comfyui_eligen.lab import workflows

EXAMPLES = workflows.EXAMPLES_DIR
NAMES = sorted(os.path.basename(path)[:-5] for path in glob.glob(os.path.join(EXAMPLES, "*.json")))
NUMBERED = re.compile(r"EliGen (\d+) - (\S.*)")
MAX_THUMBNAIL_BYTES = 80_000
WINDOWS_RESERVED = set('<>:"/\\|?*')


def number(name):
    return int(NUMBERED.fullmatch(name).group(1))


def api_graph(name):
    with open(os.path.join(EXAMPLES, "api", f"{name}.json")) as f:
        return json.load(f)


def note(name):
    with open(os.path.join(EXAMPLES, "notes", f"{name}.md")) as f:
        return f.read()


def test_names_are_numbered_titles_without_gaps():
    assert len(NAMES) >= 9
    assert all(NUMBERED.fullmatch(name) for name in NAMES), NAMES
    assert sorted(number(name) for name in NAMES) == list(range(1, len(NAMES) + 1))
    for name in NAMES:
        # the card's description is the name with '-' and '_' read as spaces: no underscores
        assert "_" not in name and name.isascii() and not WINDOWS_RESERVED & set(name), name
        assert len(name) <= 38, name  # the newer frontend shows about 38 characters of a card title


def test_toy_templates_come_first_and_each_api_twin_and_note_is_there():
    toy = set(workflows.TEMPLATE_NAMES.values())
    assert toy <= set(NAMES)
    assert max(number(n) for n in toy) < min(number(n) for n in set(NAMES) - toy)
    for name in NAMES:
        assert api_graph(name) and note(name).strip()


def lora_users_and_trainers():
    """{LoRA file: template numbers that load it} and {LoRA file: the template number that trains it}."""
    users, trainers = {}, {}
    for name in NAMES:
        for node in api_graph(name).values():
            inputs = node["inputs"]
            if node["class_type"] in ("LoraLoader", "LoraLoaderModelOnly", "EliGenLoraLoader"):
                users.setdefault(inputs["lora_name"], []).append(number(name))
            if node["class_type"] == "EliGenTrain":
                trainers[inputs["lora_name"] + ".safetensors"] = number(name)
    return users, trainers


def test_a_template_that_loads_a_trained_lora_comes_after_its_trainer_and_says_so():
    users, trainers = lora_users_and_trainers()
    trained_here = {lora: numbers for lora, numbers in users.items() if lora in trainers}
    assert trained_here, "no template loads a LoRA another template trains: nothing checked"
    by_number = {number(name): name for name in NAMES}
    for lora, numbers in trained_here.items():
        trainer = trainers[lora]
        for user in numbers:
            assert user > trainer, f"template {user} loads {lora} but is listed before template {trainer}, which trains it"
            name = by_number[user]
            assert f"from {trainer}" in name, f"{name!r}: the card does not say it needs template {trainer}"
            assert f"run template {trainer} first" in note(name).lower(), name


TIME_WORDS = re.compile(r"\b(\d+(\.\d+)? ?(s|min)|seconds?|minutes?|hours?)\b", re.IGNORECASE)
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


@pytest.mark.parametrize("name", NAMES)
def test_a_note_that_promises_a_time_says_what_was_measured_on_what_and_when(name):
    text = note(name)
    if not TIME_WORDS.search(text):
        return
    assert DATE.search(text), f"{name}: a time without the date it was measured"
    assert re.search(r"\bcores?\b", text), f"{name}: a time without the machine (cores)"
    assert re.search(r"\bload\b|\bidle\b", text), f"{name}: a time without how busy the machine was"


@pytest.mark.parametrize("name", NAMES)
def test_every_template_has_a_small_jpeg_thumbnail_with_a_picture(name):
    path = os.path.join(EXAMPLES, f"{name}.jpg")
    assert os.path.isfile(path), f"no thumbnail {name}.jpg (scripts/toyworld.py thumbnails makes them)"
    assert os.path.getsize(path) <= MAX_THUMBNAIL_BYTES
    with Image.open(path) as image:
        assert image.format == "JPEG"
        assert image.size[0] == image.size[1] >= 256
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, f"{name}.jpg is (nearly) one flat colour"
