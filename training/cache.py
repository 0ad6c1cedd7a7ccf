"""Encoding cache: VAE latents and text embeddings computed once, reused by later epochs and later runs.

Entries live in memory and, when a directory is given, on disk as safetensors files (atomic writes).
Each entry's key is a sha256 over what decides its value:

- latent: the image's bytes (file bytes, or pixel bytes for graph images), the training size and resize
  settings, and the identity of the VAE and the latent format;
- text: the prompt text, the tokenizer options, and the identity of the text encoder.

The identity of an encoder is its class plus a fingerprint of its weights (a strided sample of every
tensor, computed once per module) plus any patches (a LoRA on the text encoder changes its output).
Text entries are per prompt, so a prompt shared by many records ("a red circle") is encoded once.
Masks need no encoder: they are re-read and resized for every call (cheap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections import OrderedDict

import torch
from safetensors.torch import load_file, save_file

from ..core import host
from ..core.files import atomic_path
from .dataset import EliGenDataset, prepare_image, prepare_masks
from .sample import Sample

CACHE_VERSION = 1
RESIZE_RULE = "cover-bilinear-centre-crop/exif"  # part of the latent key: change it when the rule changes
FINGERPRINT_SAMPLES = 64  # elements sampled from each weight tensor


# ---------------------------------------------------------------------------------------------------
# Encoder identity


def _sample_bytes(tensor: torch.Tensor, samples: int = FINGERPRINT_SAMPLES) -> bytes:
    """Raw bytes of ``samples`` elements spread evenly over the tensor (any dtype, any device)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    rows = flat.view(torch.uint8).view(flat.numel(), -1)  # one row of bytes per element
    count = min(samples, flat.numel())
    # integer arithmetic: float32 linspace rounds past the last element of a large tensor
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    return rows[index].cpu().numpy().tobytes()


def _hash_tensor(h, tensor: torch.Tensor):
    h.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    try:
        h.update(_sample_bytes(tensor))
    except (RuntimeError, TypeError, NotImplementedError):
        pass  # quantized tensor subclasses may not allow a byte view; shape and dtype still count


_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def module_fingerprint(module: torch.nn.Module, original_weights: dict | None = None) -> str:
    """sha256 of the class, names, shapes, dtypes and sampled values of every tensor; computed once per module.

    ``original_weights`` (``host.weights.patched_weight_originals(patcher)``: weight key -> tensor) replaces weights currently patched in place, so a
    module gives the same fingerprint whether its patcher has applied patches or not.
    """
    if module in _FINGERPRINTS:
        return _FINGERPRINTS[module]
    h = hashlib.sha256(type(module).__qualname__.encode())
    original_weights = original_weights or {}
    for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
        if name in original_weights:
            tensor = original_weights[name]
        h.update(name.encode())
        _hash_tensor(h, tensor)
    _FINGERPRINTS[module] = h.hexdigest()
    return _FINGERPRINTS[module]


def _hash_patch_value(h, value):
    if isinstance(value, torch.Tensor):
        _hash_tensor(h, value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _hash_patch_value(h, v)
    elif hasattr(value, "weights"):  # comfy.weight_adapter objects keep their tensors in .weights
        h.update(type(value).__qualname__.encode())
        _hash_patch_value(h, value.weights)
    else:
        h.update(repr(value).encode() if isinstance(value, (int, float, str, bool, type(None))) else
                 type(value).__qualname__.encode())


def patcher_fingerprint(patcher) -> str:
    """Digest of a ModelPatcher's weight patches (keys, strengths and sampled patch tensors)."""
    patches = host.weights.weight_patches(patcher)
    h = hashlib.sha256()
    for key in sorted(patches):
        h.update(key.encode())
        _hash_patch_value(h, patches[key])
    return h.hexdigest()


def _model_identity(kind: str, module, patcher, extra: dict) -> str:
    parts = {"kind": kind, "extra": extra}
    if module is not None:
        parts["module"] = module_fingerprint(module, host.weights.patched_weight_originals(patcher))
    if patcher is not None:
        parts["patches"] = patcher_fingerprint(patcher)
    return json.dumps(parts, sort_keys=True, default=str)


def latent_format_of(latent_format):
    """A latent format object from a LatentFormat, a MODEL (ModelPatcher) or None (no processing)."""
    if latent_format is not None and hasattr(latent_format, "get_model_object"):
        return latent_format.get_model_object("latent_format")
    return latent_format


def vae_identity(vae, latent_format=None) -> str:
    module, patcher, extra = host.encoders.vae_identity_parts(vae)
    latent_format = latent_format_of(latent_format)
    fmt = None
    if latent_format is not None:
        fmt = {"class": type(latent_format).__qualname__,
               "scale": getattr(latent_format, "scale_factor", None),
               "shift": getattr(latent_format, "shift_factor", None)}
    return _model_identity("vae", module, patcher, {**extra, "latent_format": fmt})


def clip_identity(clip) -> str:
    module, patcher, extra = host.encoders.clip_identity_parts(clip)
    return _model_identity("clip", module, patcher, extra)


def make_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The store


# What every entry of a kind must hold (a file without it is damaged: a miss, written again).
REQUIRED_KEYS = {"latent": ("latent",), "text": ("cond",)}


def entry_problem(kind, entry):
    """None for a usable cache entry, else what is wrong with it (a missing key, NaN or inf values)."""
    missing = [key for key in REQUIRED_KEYS.get(kind, ()) if key not in entry]
    if missing:
        return f"no {', '.join(repr(k) for k in missing)} tensor"
    for name, tensor in entry.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} holds NaN or inf values"
    return None


class EncodingCache:
    """Memory dict plus an optional folder of safetensors files, one per entry.

    ``max_memory_bytes`` bounds what the memory part holds (least recently used entries go first; the
    disk part keeps everything). ``encoder_calls`` counts real encoder work done through this cache
    (``vae`` batches, ``vae_images``, ``text`` prompts); ``hits`` counts entries served from ``memory``
    and from ``disk``.
    """

    def __init__(self, directory: str | None = None, keep_in_memory: bool = True,
                 max_memory_bytes: int | None = None):
        self.directory = os.path.abspath(directory) if directory else None
        self.keep_in_memory = keep_in_memory
        self.max_memory_bytes = max_memory_bytes
        self.memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.memory_bytes = 0
        self.encoder_calls = {"vae": 0, "vae_images": 0, "text": 0}
        self.hits = {"memory": 0, "disk": 0}
        self.misses = 0

    def _path(self, kind: str, key: str) -> str:
        return os.path.join(self.directory, kind, key + ".safetensors")

    def _remember(self, slot: str, entry: dict[str, torch.Tensor]):
        if not self.keep_in_memory:
            return
        if slot in self.memory:
            self.memory_bytes -= _entry_bytes(self.memory.pop(slot))
        self.memory[slot] = entry
        self.memory_bytes += _entry_bytes(entry)
        while self.max_memory_bytes is not None and self.memory_bytes > self.max_memory_bytes and self.memory:
            self.memory_bytes -= _entry_bytes(self.memory.popitem(last=False)[1])

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        slot = kind + "/" + key
        entry = self.memory.get(slot)
        if entry is not None:
            self.memory.move_to_end(slot)
            self.hits["memory"] += 1
            return entry
        if self.directory is not None:
            path = self._path(kind, key)
            if os.path.exists(path):
                try:
                    entry = load_file(path)
                except Exception as e:  # a damaged file is a miss; it is rewritten after encoding
                    logging.warning(f"EliGen cache: ignoring unreadable entry {path} ({e})")
                else:
                    problem = entry_problem(kind, entry)
                    if problem is None:
                        self.hits["disk"] += 1
                        self._remember(slot, entry)
                        return entry
                    logging.warning(f"EliGen cache: ignoring damaged entry {path} ({problem}); encoding it again")
        self.misses += 1
        return None

    def put(self, kind: str, key: str, entry: dict[str, torch.Tensor], note: str = ""):
        entry = {name: t.detach().to("cpu").contiguous() for name, t in entry.items()}
        self._remember(kind + "/" + key, entry)
        if self.directory is not None:
            path = self._path(kind, key)
            with atomic_path(path) as tmp:
                # clone: safetensors refuses tensors that share storage
                save_file({k: v.clone() for k, v in entry.items()}, tmp,
                          metadata={"eligen_cache_version": str(CACHE_VERSION), "kind": kind, "note": note[:200]})
        return entry

    def clear_memory(self):
        self.memory.clear()
        self.memory_bytes = 0


def _entry_bytes(entry: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


SHARED_MEMORY_BYTES = 4 << 30  # what the process-wide caches keep in RAM, each
_SHARED: dict[str | None, EncodingCache] = {}


def shared_cache(directory: str | None = None) -> EncodingCache:
    """One cache per directory (None: memory only) for the whole process, so a second training run in
    the same ComfyUI session reuses the first run's encodings even without a disk folder."""
    slot = os.path.abspath(directory) if directory else None
    if slot not in _SHARED:
        _SHARED[slot] = EncodingCache(slot, max_memory_bytes=SHARED_MEMORY_BYTES)
    return _SHARED[slot]


def cache_for_mode(mode: str, directory: str) -> EncodingCache:
    """The cache of the encoding option ``cache``: "memory" (the process-wide memory cache: reused by
    later runs in this process), "disk" (also ``directory``, reused across restarts) or "off" (nothing
    kept beyond this run). The same for the node and the command line."""
    if mode == "memory":
        return shared_cache(None)
    if mode == "disk":
        return shared_cache(directory)
    if mode == "off":
        return EncodingCache(None)
    raise ValueError(f"cache {mode!r} is not one of memory, disk, off")


# ---------------------------------------------------------------------------------------------------
# Encoding a dataset


def encode_text(clip, text: str, tokenizer_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cond [1, L, D], pooled or None) through ComfyUI's CLIP object, as CLIPTextEncode does.

    ``tokenizer_options`` are merged over the CLIP object's own; FLUX entities use
    ``{"t5xxl_min_length": 512}`` to pad like the released adapter.
    """
    tokens = clip.tokenize(text, tokenizer_options=tokenizer_options) if tokenizer_options else clip.tokenize(text)
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    pooled = out.get("pooled_output")
    return out["cond"], pooled if isinstance(pooled, torch.Tensor) else None


def _image_digest(dataset: EliGenDataset, i: int) -> str:
    record = dataset.records[i]
    h = hashlib.sha256()
    if record.image_path is not None:
        with open(record.image_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(str(record.image.shape).encode())
        h.update(record.image.tobytes())
    return h.hexdigest()


def _text_entries(texts_and_options, clip, cache: EncodingCache, progress):
    """{(text, options json): entry}, encoding only the misses."""
    identity = clip_identity(clip)
    entries = {}
    for text, options in texts_and_options:
        slot = (text, json.dumps(options, sort_keys=True))
        if slot in entries:
            continue
        key = make_key(kind="text", text=text, tokenizer_options=options, encoder=identity)
        entry = cache.get("text", key)
        if entry is None:
            cond, pooled = encode_text(clip, text, options)
            cache.encoder_calls["text"] += 1
            entry = cache.put("text", key, {"cond": cond} if pooled is None else {"cond": cond, "pooled": pooled},
                              note=text)
            progress()
        entries[slot] = entry
    return entries


def encode_dataset(dataset: EliGenDataset, vae, clip, latent_format=None, cache: EncodingCache | None = None,
                   entity_tokenizer_options: dict | None = None, prompt_tokenizer_options: dict | None = None,
                   vae_batch_size: int = 4, progress=None) -> list[Sample]:
    """A Sample for every record, running the encoders only for what the cache lacks.

    vae: comfy.sd.VAE (``encode(pixels [B, H, W, 3])``); clip: comfy.sd.CLIP; latent_format: a
    LatentFormat, a MODEL whose latent format to use, or None (latents as the VAE returns them).
    ``progress(done, total)`` is called after each encoder call (total = work not found in the cache is
    unknown up front, so ``total`` is the number of records plus prompts).
    """
    cache = cache if cache is not None else EncodingCache()
    fmt = latent_format_of(latent_format)
    entity_options = dict(entity_tokenizer_options or {})
    prompt_options = dict(prompt_tokenizer_options or {})
    records = dataset.records
    total = len(records) * 2 + sum(len(r.entities) for r in records)
    done = [0]

    def step(n=1):
        done[0] += n
        if progress is not None:
            progress(min(done[0], total), total)

    # Latents: look every record up, then encode the misses in batches of one training size.
    vae_id = vae_identity(vae, fmt)
    keys = [make_key(kind="latent", image=_image_digest(dataset, i), size=dataset.bucket_of(i),
                     max_pixels=dataset.max_pixels, multiple=dataset.multiple, rule=RESIZE_RULE, encoder=vae_id)
            for i in range(len(records))]
    found, missing = {}, {}  # missing: size -> {key: first record with it}; a repeated image encodes once
    for i, key in enumerate(keys):
        if key in found or key in missing.get(dataset.bucket_of(i), {}):
            continue
        entry = cache.get("latent", key)
        if entry is not None:
            found[key] = entry["latent"]
        else:
            missing.setdefault(dataset.bucket_of(i), {})[key] = i
    for size, members in missing.items():
        members = list(members.items())
        for start in range(0, len(members), max(1, vae_batch_size)):
            chunk = members[start:start + vae_batch_size]
            pixels = torch.stack([prepare_image(records[i], size) for _, i in chunk]).movedim(1, -1)
            encoded = vae.encode(pixels)
            if fmt is not None:
                encoded = fmt.process_in(encoded)
            cache.encoder_calls["vae"] += 1
            cache.encoder_calls["vae_images"] += len(chunk)
            for (key, i), latent in zip(chunk, encoded):
                found[key] = cache.put("latent", key, {"latent": latent}, note=records[i].name)["latent"]
            step(len(chunk))

    # Text: one entry per distinct (prompt, options); entities each on their own.
    wanted = [(r.prompt, prompt_options) for r in records]
    wanted += [(e.prompt, entity_options) for r in records for e in r.entities]
    texts = _text_entries(wanted, clip, cache, step)

    samples = []
    for i, record in enumerate(records):
        masks = prepare_masks(record, dataset.bucket_of(i))
        glob = texts[(record.prompt, json.dumps(prompt_options, sort_keys=True))]
        entity_embeds = [texts[(e.prompt, json.dumps(entity_options, sort_keys=True))]["cond"] for e in record.entities]
        samples.append(Sample(found[keys[i]], glob["cond"], glob.get("pooled"), entity_embeds, masks, index=i,
                              prompt=record.prompt, entity_prompts=record.entity_prompts))
    if progress is not None:
        progress(total, total)
    return samples

