"""EliGen training data: records, validation, the reference resize rule, and aspect buckets.

A dataset comes from a folder (the reference's ``metadata.json`` / ``metadata.jsonl``) or from graph
inputs (an IMAGE batch, a MASK batch, prompts). Every record is checked before training starts and all
problems are raised together in one ``DatasetError``, each naming the record, the file and the reason.

Record format (paths relative to the dataset folder; masks white on black, same size as the image)::

    {"image": "x.jpg", "prompt": "global caption",
     "eligen_entity_prompts": ["a red circle", "a blue square"],
     "eligen_entity_masks": ["x_m0.png", "x_m1.png"]}

A record without entities (keys missing or empty lists) is a plain sample.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.mask_rule import resize_nearest

METADATA_NAMES = ("metadata.json", "metadata.jsonl")
DEFAULT_MAX_PIXELS = 1024 * 1024
MAX_MAX_PIXELS = 16 * 1024 * 1024  # the largest max_pixels a node or a run file may ask for
SIDE_MULTIPLE = 16  # the reference floors both sides to a multiple of 16
MAX_LISTED_PROBLEMS = 200  # the message lists this many; DatasetError.problems keeps all


class DatasetError(ValueError):
    """Every problem found in a dataset, one line each (``problems``), raised before training starts."""

    def __init__(self, problems: list[str], source: str = "dataset"):
        self.problems = list(problems)
        self.source = source
        lines = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        header = f"{_count(len(self.problems), 'problem')} in {source}:"
        super().__init__("\n".join([header] + ["  " + line for line in lines]))


@dataclass
class EntityRecord:
    prompt: str
    mask: np.ndarray | None = None  # bool [H, W]; None when it stays on disk until needed
    mask_path: str | None = None  # absolute path of the mask file (folder datasets)
    mask_name: str | None = None  # the path as written in the metadata, for messages

    def load_mask(self) -> np.ndarray:
        return self.mask if self.mask is not None else read_mask(self.mask_path)


@dataclass
class Record:
    index: int
    image_path: str | None  # absolute path (folder datasets) or None (images from the graph)
    image: np.ndarray | None  # uint8 [H, W, 3] when held in memory
    prompt: str
    entities: list[EntityRecord] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # original (height, width)
    name: str = ""  # what messages call it: the image path as written, or "image 2 of the batch"

    def load_image(self) -> np.ndarray:
        return self.image if self.image is not None else read_image(self.image_path)

    @property
    def entity_prompts(self) -> list[str]:
        return [entity.prompt for entity in self.entities]


@dataclass
class EliGenDataset:
    """Validated records plus the resize settings; ``sizes[i]`` is record i's training size (H, W)."""

    records: list[Record]
    root: str | None
    max_pixels: int = DEFAULT_MAX_PIXELS
    multiple: int = SIDE_MULTIPLE
    source: str = "dataset"
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.sizes:
            self.sizes = [target_size(*r.size, self.max_pixels, self.multiple) for r in self.records]

    def __len__(self):
        return len(self.records)

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self.sizes[i]

    def summary(self) -> str:
        counts: dict[tuple[int, int], int] = {}
        for size in self.sizes:
            counts[size] = counts.get(size, 0) + 1
        entities = sum(len(r.entities) for r in self.records)
        plain = sum(1 for r in self.records if not r.entities)
        buckets = ", ".join(f"{w}x{h} ({n})" for (h, w), n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return (f"{_count(len(self.records), 'record')} from {self.source}, {_count(entities, 'entity', 'entities')}, "
                f"{_count(plain, 'plain sample')}; max_pixels {self.max_pixels}; sizes: {buckets}")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


# ---------------------------------------------------------------------------------------------------
# The reference resize rule


def target_size(height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """Training size (H, W): shrink (keeping aspect) until H*W <= max_pixels, then floor to ``multiple``.

    Smaller images are never enlarged. A side may come out 0 for a tiny image; validation reports it.
    """
    if height * width > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        height, width = int(height / scale), int(width / scale)
    return height // multiple * multiple, width // multiple * multiple


def _cover_and_crop_box(height, width, target):
    """Scaled size that covers ``target`` and the centred crop box inside it (left, top, right, bottom)."""
    th, tw = target
    scale = max(tw / width, th / height)
    sw, sh = max(tw, round(width * scale)), max(th, round(height * scale))
    left, top = round((sw - tw) / 2), round((sh - th) / 2)
    return (sw, sh), (left, top, left + tw, top + th)


def resize_image(image: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [th, tw, 3]: bilinear resize to cover, then centre crop."""
    (sw, sh), box = _cover_and_crop_box(image.shape[0], image.shape[1], target)
    pil = Image.fromarray(image)
    if (sw, sh) != pil.size:
        pil = pil.resize((sw, sh), Image.BILINEAR)
    return np.array(pil.crop(box))  # a writable copy


def resize_mask(mask: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """bool [H, W] -> bool [th, tw]: the image's resize and crop, with the mask rule's PIL-exact nearest
    (core/mask_rule.py, also used for sampling) so the mask stays sharp."""
    (sw, sh), (left, top, right, bottom) = _cover_and_crop_box(mask.shape[0], mask.shape[1], target)
    return np.ascontiguousarray(resize_nearest(np.asarray(mask, dtype=bool), (sh, sw))[top:bottom, left:right])


def prepare_image(record: Record, bucket: tuple[int, int]) -> torch.Tensor:
    """Pixels of one record at its bucket size (H, W): float32 [3, H, W] in [0, 1]."""
    image = resize_image(record.load_image(), bucket)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def prepare_masks(record: Record, bucket: tuple[int, int]) -> torch.Tensor:
    """Entity masks of one record at its bucket size: float32 [N, H, W] in {0, 1}; N may be 0."""
    masks = [resize_mask(entity.load_mask(), bucket) for entity in record.entities]
    stacked = np.stack(masks) if masks else np.zeros((0,) + tuple(bucket), dtype=bool)
    return torch.from_numpy(stacked.astype(np.float32))


# ---------------------------------------------------------------------------------------------------
# Reading files


def eight_bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey images (PNG ``I;16``, TIFF ``I``/``F``) scaled to 8-bit ``L``; converting them
    directly would clip every value above 255 to white. Other modes are returned unchanged."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im).astype(np.float64)
        if im.mode == "I" and values.max(initial=0) <= 255:
            scaled = values  # an 8-bit image stored as 32-bit integers
        else:
            scaled = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0  # float images are 0..1 or 0..255
        return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), "L")
    return im


def _open_oriented(path: str) -> Image.Image:
    with Image.open(path) as im:
        im.load()  # decodes everything: a truncated or corrupt file fails here, not mid-training
        return eight_bit(ImageOps.exif_transpose(im))  # same orientation rule as ComfyUI's LoadImage


def read_image(path: str) -> np.ndarray:
    """uint8 [H, W, 3]."""
    return np.asarray(_open_oriented(path).convert("RGB"))


def mask_from_pil(im: Image.Image) -> np.ndarray:
    """White on black in any mode -> bool [H, W]. Transparent pixels count as black."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im)
    return np.asarray(im.convert("L")) > 127


def read_mask(path: str) -> np.ndarray:
    return mask_from_pil(_open_oriented(path))


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) after EXIF orientation, decoding the whole file to prove it is readable."""
    im = _open_oriented(path)
    return im.height, im.width


# ---------------------------------------------------------------------------------------------------
# Folder datasets


def _resolve_inside(root_real: str, relative: str, what: str) -> tuple[str | None, str | None]:
    """(absolute path, None) when ``relative`` stays inside the folder, else (None, reason)."""
    if any(ord(c) < 32 for c in relative):
        return None, f"{what} path {relative!r} holds a NUL or another control character"
    if os.path.isabs(relative) or os.path.splitdrive(relative)[0]:
        return None, f"{what} path '{relative}' is absolute; paths must be relative to the dataset folder"
    joined = os.path.normpath(os.path.join(root_real, relative))
    if os.path.commonpath([joined, root_real]) != root_real:
        return None, f"{what} path '{relative}' leaves the dataset folder"
    real = os.path.realpath(joined)
    if os.path.commonpath([real, root_real]) != root_real:
        return None, f"{what} path '{relative}' is a link that points outside the dataset folder"
    return real, None


def _check_file(path: str, relative: str, what: str, reader):
    """(value of reader(path), None) or (None, reason) for a missing or unreadable file."""
    if not os.path.exists(path):
        return None, f"{what} '{relative}' not found"
    if not os.path.isfile(path):
        return None, f"{what} '{relative}' is not a file"
    try:
        return reader(path), None
    except Exception as e:  # PIL raises many types for bad files; the message is what matters
        return None, f"{what} '{relative}' cannot be read as an image ({type(e).__name__}: {e})"


def _read_metadata(path: str) -> tuple[list, list[str]]:
    """Raw records and problems. JSON: a list of objects. JSONL: one object per non-blank line."""
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"{name}: cannot be read ({e})"]
    if path.endswith(".jsonl"):
        raw, problems = [], []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                problems.append(f"record {len(raw)} ({name} line {line_number}): not valid JSON ({e.msg})")
                raw.append(None)  # keeps later record numbers equal to their position in the file
        return raw, problems
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"]
    if not isinstance(data, list):
        return [], [f"{name}: expected a list of records, got {type(data).__name__}"]
    return data, []


def find_metadata(folder: str) -> str:
    """The metadata file of a dataset folder (or the file itself when given one)."""
    if os.path.isfile(folder):
        if not folder.endswith((".json", ".jsonl")):
            raise DatasetError([f"'{folder}' is not a .json or .jsonl metadata file"], "the dataset")
        return folder
    if not os.path.isdir(folder):
        raise DatasetError([f"dataset folder '{folder}' not found"], "the dataset")
    found = [os.path.join(folder, n) for n in METADATA_NAMES if os.path.isfile(os.path.join(folder, n))]
    if not found:
        raise DatasetError([f"no metadata.json or metadata.jsonl in '{folder}'"], "the dataset")
    if len(found) > 1:
        raise DatasetError([f"both metadata.json and metadata.jsonl are in '{folder}'; keep one"], "the dataset")
    return found[0]


def _string_list(item: dict, key: str, label: str, problems: list[str]) -> list[str] | None:
    """The list under ``key`` ([] when absent), or None after reporting a wrong type."""
    value = item.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{label}: '{key}' must be a list of strings, got {json.dumps(value)[:80]}")
        return None
    return value


def _parse_folder_record(index: int, item, root_real: str) -> tuple[Record | None, list[str]]:
    if item is None:
        return None, []  # a JSONL line that did not parse; already reported
    if not isinstance(item, dict):
        return None, [f"record {index}: expected an object with 'image' and 'prompt', got {type(item).__name__}"]
    image_name = item.get("image")
    shown = image_name if isinstance(image_name, str) and image_name.isprintable() else repr(image_name)
    label = f"record {index}" + (f" ({shown})" if isinstance(image_name, str) else "")
    problems = []
    if "image" not in item:
        problems.append(f"{label}: missing key 'image'")
    elif not isinstance(image_name, str) or not image_name:
        problems.append(f"{label}: 'image' must be a non-empty path string, got {json.dumps(image_name)[:80]}")
    if "prompt" not in item:
        problems.append(f"{label}: missing key 'prompt'")
    elif not isinstance(item["prompt"], str):
        problems.append(f"{label}: 'prompt' must be a string, got {type(item['prompt']).__name__}")
    prompts = _string_list(item, "eligen_entity_prompts", label, problems)
    mask_names = _string_list(item, "eligen_entity_masks", label, problems)
    if prompts is None or mask_names is None:
        prompts, mask_names = prompts or [], mask_names or []
    elif len(prompts) != len(mask_names):
        problems.append(f"{label}: {len(prompts)} entity prompts but {len(mask_names)} entity masks "
                        "('eligen_entity_prompts' and 'eligen_entity_masks' are matched by position)")
    for k, prompt in enumerate(prompts):
        if not prompt.strip():
            problems.append(f"{label}: entity prompt {k} is empty")

    size = None
    if isinstance(image_name, str) and image_name:
        image_path, reason = _resolve_inside(root_real, image_name, "image")
        if reason is None:
            size, reason = _check_file(image_path, image_name, "image", _image_size)
        if reason:
            problems.append(f"{label}: {reason}")
    entities = []
    for k, mask_name in enumerate(mask_names):
        mask_path, reason = _resolve_inside(root_real, mask_name, f"mask {k}")
        mask_size = None
        if reason is None:
            mask_size, reason = _check_file(mask_path, mask_name, f"mask {k}", _image_size)
        if reason:
            problems.append(f"{label}: {reason}")
        elif size is not None and mask_size != size:
            problems.append(f"{label}: mask {k} '{mask_name}' is {mask_size[1]}x{mask_size[0]} "
                            f"but the image is {size[1]}x{size[0]}")
        if k < len(prompts):
            entities.append(EntityRecord(prompts[k], None, mask_path, mask_name))
    if problems:
        return None, problems
    record = Record(index, image_path, None, item["prompt"], entities, size, image_name)
    return record, []


def _check_sizes(records: list[Record], max_pixels: int, multiple: int) -> list[str]:
    problems = []
    for r in records:
        th, tw = target_size(*r.size, max_pixels, multiple)
        if th == 0 or tw == 0:
            problems.append(f"record {r.index} ({r.name}): image is {r.size[1]}x{r.size[0]}; with max_pixels "
                            f"{max_pixels} a side falls below {multiple} px")
    return problems


def dataset_fingerprint(folder: str) -> str:
    """sha256 over the size and mtime of the metadata file and every file it names (cheap: no reading).

    Used to tell whether a folder changed since the last run; unreadable entries just count as absent.
    """
    metadata = find_metadata(folder)
    root = os.path.dirname(os.path.abspath(metadata))
    raw, _ = _read_metadata(metadata)
    names = [os.path.basename(metadata)]
    for item in raw:
        if isinstance(item, dict):
            masks = item.get("eligen_entity_masks")
            masks = masks if isinstance(masks, list) else []  # a bad value is reported by load_dataset
            names += [v for v in [item.get("image")] + masks if isinstance(v, str)]
    h = hashlib.sha256()
    for name in names:
        try:
            stat = os.stat(os.path.join(root, name))
            h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        except (OSError, ValueError, TypeError):
            h.update(f"{name}:absent;".encode())
    return h.hexdigest()


def load_dataset(folder: str, max_pixels: int = DEFAULT_MAX_PIXELS, multiple: int = SIDE_MULTIPLE) -> EliGenDataset:
    """Read and check a folder dataset (metadata.json or metadata.jsonl); raise DatasetError listing every problem."""
    if max_pixels < multiple * multiple:
        raise DatasetError([f"max_pixels {max_pixels} is below {multiple}x{multiple}"], "the dataset settings")
    metadata = find_metadata(folder)
    root_real = os.path.realpath(os.path.dirname(os.path.abspath(metadata)))
    source = os.path.basename(metadata) + " of " + os.path.basename(root_real)
    raw, problems = _read_metadata(metadata)
    records = []
    for index, item in enumerate(raw):
        record, record_problems = _parse_folder_record(index, item, root_real)
        problems += record_problems
        if record is not None:
            records.append(record)
    if not raw and not problems:
        problems.append(f"{os.path.basename(metadata)} has no records (the dataset is empty)")
    problems += _check_sizes(records, max_pixels, multiple)
    if problems:
        raise DatasetError(problems, source)
    return EliGenDataset(records, root_real, max_pixels, multiple, source)


# ---------------------------------------------------------------------------------------------------
# Datasets from graph inputs


def split_lines(text: str | list[str]) -> list[str]:
    """Prompts one per line (blank lines ignored), or a list passed through."""
    if isinstance(text, (list, tuple)):
        return [str(t) for t in text]
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_entity_prompts(text: str | list) -> list[list[str]]:
    """Entity prompts per image: one line per image, entities separated by ``|`` (``-`` or empty: none).

    Blank lines are kept only between other lines, so ``"a | b\\n\\nc"`` means image 1 has no entities.
    A list of lists is passed through.
    """
    if isinstance(text, (list, tuple)):
        return [[str(p) for p in item] if isinstance(item, (list, tuple)) else [str(item)] for item in text]
    lines = text.strip("\n").splitlines() if text.strip() else []
    result = []
    for line in lines:
        line = line.strip()
        result.append([] if line in ("", "-") else [part.strip() for part in line.split("|")])
    return result


def dataset_from_images(images, masks, prompts, entity_prompts, max_pixels: int = DEFAULT_MAX_PIXELS,
                        multiple: int = SIDE_MULTIPLE) -> EliGenDataset:
    """A dataset from graph inputs.

    images: IMAGE float [B, H, W, 3] in [0, 1]. masks: MASK float [M, H, W] (or [H, W], or None).
    prompts: one per image, or a single one shared by all (text: one per line; empty: "" for all).
    entity_prompts: per image a list of prompts (text: one line per image, ``a | b | c``); a single line
    is shared by all images. Masks are taken in order: image 0's entities first, then image 1's, ...
    """
    problems = []
    if images is None or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        shape = None if images is None else tuple(images.shape)
        raise DatasetError([f"images: expected an IMAGE batch [B, H, W, 3], got shape {shape}"], "the graph inputs")
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    if masks is not None and masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks is not None and masks.ndim != 3:
        problems.append(f"masks: expected a MASK batch [M, H, W], got shape {tuple(masks.shape)}")
        masks = None
    mask_count = 0 if masks is None else masks.shape[0]

    global_prompts = split_lines(prompts) or [""]  # no caption at all: an empty global prompt for every image
    if len(global_prompts) == 1:
        global_prompts = global_prompts * batch
    elif len(global_prompts) != batch:
        problems.append(f"prompts: {len(global_prompts)} prompts for {batch} images "
                        "(give one per line for each image, or a single one for all)")

    per_image = parse_entity_prompts(entity_prompts)
    if len(per_image) == 1 and batch > 1:
        per_image = per_image * batch
    elif len(per_image) == 0:
        per_image = [[] for _ in range(batch)]
    elif len(per_image) != batch:
        problems.append(f"entity_prompts: {len(per_image)} lines for {batch} images "
                        "(one line per image with prompts separated by '|', or a single line for all)")
    wanted = sum(len(p) for p in per_image)
    if not problems and wanted != mask_count:
        counts = ", ".join(str(len(p)) for p in per_image)
        problems.append(f"entity_prompts name {wanted} entities (per image: {counts}) but {mask_count} masks were given; "
                        "masks are taken in order, image 0's entities first")
    if masks is not None and mask_count and (masks.shape[1], masks.shape[2]) != (height, width):
        problems.append(f"masks are {masks.shape[2]}x{masks.shape[1]} but the images are {width}x{height}")
    for b, entity_list in enumerate(per_image[:batch]):
        for k, prompt in enumerate(entity_list):
            if not prompt:
                problems.append(f"record {b} (image {b} of the batch): entity prompt {k} is empty")
    for b in range(batch):
        if not bool(torch.isfinite(images[b]).all()):
            problems.append(f"record {b} (image {b} of the batch): the image holds NaN or inf values")
    for m in range(mask_count):
        if not bool(torch.isfinite(masks[m]).all()):
            problems.append(f"masks: mask {m} of the batch holds NaN or inf values")
    if problems:
        raise DatasetError(problems, "the graph inputs")

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    mask_bits = None if masks is None else (masks.detach().float().cpu().numpy() > 0.5)
    records, next_mask = [], 0
    for b in range(batch):
        entities = []
        for prompt in per_image[b]:
            entities.append(EntityRecord(prompt, mask_bits[next_mask], None, f"mask {next_mask} of the batch"))
            next_mask += 1
        records.append(Record(b, None, pixels[b], global_prompts[b], entities, (height, width),
                              f"image {b} of the batch"))
    problems = _check_sizes(records, max_pixels, multiple)
    if problems:
        raise DatasetError(problems, "the graph inputs")
    return EliGenDataset(records, None, max_pixels, multiple, f"{batch} graph images")
