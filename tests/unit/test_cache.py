"""Encoding cache: encoders run once per content and settings, in memory and across runs on disk.

Uses the toy world's real ComfyUI objects (comfy.sd.VAE / comfy.sd.CLIP subclasses). Encoder calls are
counted twice: by the cache's own counters and by wrapping the encoder methods of these objects.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training.cache import (
    EncodingCache,
    clip_identity,
    encode_dataset,
    encode_text,
    latent_format_of,
    shared_cache,
)
from comfyui_eligen.training.dataset import dataset_from_images, load_dataset, prepare_image, prepare_masks
from comfyui_eligen.training.batching import bucket_key

ENTITY_OPTIONS = {"t5xxl_min_length": 12}


@pytest.fixture(scope="module")
def toy_flux():
    return load_toy_models("flux", "random", seed=0)


class CallCounter:
    """Counts calls to vae.encode and clip.encode_from_tokens by wrapping the instances' methods."""

    def __init__(self, vae, clip):
        self.vae_calls = self.clip_calls = 0
        self.targets = [(vae, "encode"), (clip, "encode_from_tokens")]
        for obj, name in self.targets:
            original = getattr(obj, name)
            setattr(obj, name, self._counting(original, name))

    def _counting(self, original, name):
        def wrapper(*args, **kwargs):
            if name == "encode":
                self.vae_calls += 1
            else:
                self.clip_calls += 1
            return original(*args, **kwargs)
        return wrapper

    def restore(self):
        for obj, name in self.targets:
            delattr(obj, name)  # the class method shows through again


@pytest.fixture
def counter(toy_flux):
    _, clip, vae = toy_flux
    c = CallCounter(vae, clip)
    yield c
    c.restore()


def make_folder(folder):
    """Four records, two sizes; the prompt 'a red circle' is shared by three entities."""
    rng = np.random.default_rng(0)
    items = []
    for i, (w, h) in enumerate([(64, 64), (80, 48), (64, 64), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[4:20, 8 * i: 8 * i + 16] = 255
        Image.fromarray(mask).save(folder / f"m{i}.png")
        item = {"image": f"im{i}.png", "prompt": f"picture {i} with a red circle"}
        if i < 3:
            item["eligen_entity_prompts"] = ["a red circle"]
            item["eligen_entity_masks"] = [f"m{i}.png"]
        items.append(item)
    (folder / "metadata.json").write_text(json.dumps(items))
    return folder


def encode(ds, toy, cache, **kwargs):
    model, clip, vae = toy
    kwargs.setdefault("entity_tokenizer_options", ENTITY_OPTIONS)
    return encode_dataset(ds, vae, clip, model, cache=cache, **kwargs)


def test_memory_cache_second_epoch_runs_no_encoder(tmp_path, toy_flux, counter):
    ds = load_dataset(str(make_folder(tmp_path)), max_pixels=64 * 64)
    cache = EncodingCache()
    first = encode(ds, toy_flux, cache)
    # 4 images in 2 sizes, 4 distinct global prompts + 1 shared entity prompt.
    assert cache.encoder_calls == {"vae": 2, "vae_images": 4, "text": 5}
    assert (counter.vae_calls, counter.clip_calls) == (2, 5)
    second = encode(ds, toy_flux, cache)
    assert (counter.vae_calls, counter.clip_calls) == (2, 5)  # nothing new ran
    assert cache.hits["memory"] == 4 + 5
    for a, b in zip(first, second):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)


def test_samples_match_direct_encoding(tmp_path, toy_flux):
    model, clip, vae = toy_flux
    ds = load_dataset(str(make_folder(tmp_path)), max_pixels=64 * 64)
    samples = encode(ds, toy_flux, EncodingCache())
    fmt = latent_format_of(model)
    for i, sample in enumerate(samples):
        size = ds.bucket_of(i)
        pixels = prepare_image(ds.records[i], size)[None].movedim(1, -1)
        assert torch.allclose(sample.latent, fmt.process_in(vae.encode(pixels))[0])
        cond, pooled = encode_text(clip, ds.records[i].prompt)
        assert torch.equal(sample.context, cond) and torch.equal(sample.pooled, pooled)
        assert torch.equal(sample.masks, prepare_masks(ds.records[i], size))
        assert sample.size == size and sample.latent.shape[-2:] == (size[0] // 8, size[1] // 8)
    # entity prompts: each on its own, with the entity tokenizer options (padding)
    assert [s.entity_prompts for s in samples] == [["a red circle"]] * 3 + [[]]
    assert samples[0].entity_embeds[0].shape[1] == ENTITY_OPTIONS["t5xxl_min_length"]
    assert torch.equal(samples[0].entity_embeds[0], encode_text(clip, "a red circle", ENTITY_OPTIONS)[0])
    assert samples[3].masks.shape == (0, 64, 64) and samples[3].entity_embeds == []
    assert bucket_key(samples[0]) == bucket_key(samples[2]) != bucket_key(samples[1])


def test_disk_cache_second_run_runs_no_encoder(tmp_path, toy_flux, counter):
    (tmp_path / "data").mkdir()
    data = make_folder(tmp_path / "data")
    ds = load_dataset(str(data), max_pixels=64 * 64)
    first = encode(ds, toy_flux, EncodingCache(str(tmp_path / "cache")))
    calls = (counter.vae_calls, counter.clip_calls)
    assert calls == (2, 5)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(files) == 9 and all(f.endswith(".safetensors") for f in files)  # no temp files left behind

    # A later run: a fresh cache object (and a freshly loaded dataset) on the same folder.
    ds_again = load_dataset(str(data), max_pixels=64 * 64)
    fresh = EncodingCache(str(tmp_path / "cache"))
    second = encode(ds_again, toy_flux, fresh)
    assert (counter.vae_calls, counter.clip_calls) == calls
    assert fresh.encoder_calls == {"vae": 0, "vae_images": 0, "text": 0} and fresh.hits["disk"] == 9
    for a, b in zip(first, second):
        assert torch.equal(a.latent, b.latent) and torch.equal(a.context, b.context)
        assert torch.equal(a.pooled, b.pooled)
        assert all(torch.equal(x, y) for x, y in zip(a.entity_embeds, b.entity_embeds))

    # A damaged entry is a miss: re-encoded and rewritten, the others still hit.
    victim = next((tmp_path / "cache" / "latent").iterdir())
    victim.write_bytes(b"garbage")
    third = EncodingCache(str(tmp_path / "cache"))
    encode(ds_again, toy_flux, third)
    assert third.encoder_calls["vae_images"] == 1 and third.hits["disk"] == 8
    assert victim.stat().st_size > 100


def test_changed_settings_and_content_miss(tmp_path, toy_flux, counter):
    data = make_folder(tmp_path)
    cache = EncodingCache(str(tmp_path / "cache"))
    encode(load_dataset(str(data), max_pixels=64 * 64), toy_flux, cache)
    base = dict(cache.encoder_calls)

    # max_pixels changes the latent keys; the text entries still hit.
    encode(load_dataset(str(data), max_pixels=48 * 48), toy_flux, cache)
    assert cache.encoder_calls["vae_images"] == base["vae_images"] + 4
    assert cache.encoder_calls["text"] == base["text"]

    # Other entity tokenizer options (padding) re-encode only the entity prompt.
    encode(load_dataset(str(data), max_pixels=64 * 64), toy_flux, cache, entity_tokenizer_options={})
    assert cache.encoder_calls["text"] == base["text"] + 1

    # New bytes under the same file name re-encode that image only.
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(data / "im0.png")
    before = cache.encoder_calls["vae_images"]
    encode(load_dataset(str(data), max_pixels=64 * 64), toy_flux, cache)
    assert cache.encoder_calls["vae_images"] == before + 1

    # A different text encoder (other weights) misses every text entry.
    _, other_clip, vae = load_toy_models("flux", "random", seed=1)
    before, vae_before = cache.encoder_calls["text"], cache.encoder_calls["vae_images"]
    encode_dataset(load_dataset(str(data), max_pixels=64 * 64), vae, other_clip, toy_flux[0], cache=cache,
                   entity_tokenizer_options=ENTITY_OPTIONS)
    assert cache.encoder_calls["text"] == before + 5
    # the toy VAE has no weights: a second instance of it is the same encoder, so latents still hit
    assert cache.encoder_calls["vae_images"] == vae_before
    # the wrapped (first) encoders ran exactly as often as the cache says
    assert counter.clip_calls == before and counter.vae_calls == cache.encoder_calls["vae"]


def test_clip_identity_sees_weights_patches_and_layer(toy_flux):
    _, clip, _ = toy_flux
    base = clip_identity(clip)
    assert clip_identity(clip) == base
    patched = clip.clone()
    key = "word_table"
    patched.add_patches({key: (torch.ones_like(clip.cond_stage_model.word_table) * 0.01,)}, 1.0)
    assert clip_identity(patched) != base
    skipped = clip.clone()
    skipped.clip_layer(-2)
    assert clip_identity(skipped) != base
    _, other, _ = load_toy_models("flux", "random", seed=3)
    assert clip_identity(other) != base


def test_qwen_image_latents_keep_the_time_axis(tmp_path):
    model, clip, vae = load_toy_models("qwen_image", "random", seed=0)
    ds = load_dataset(str(make_folder(tmp_path)), max_pixels=64 * 64)
    samples = encode_dataset(ds, vae, clip, model, cache=EncodingCache())
    assert samples[0].latent.shape == (16, 1, 8, 8)
    assert samples[1].latent.shape == (16, 1, 6, 10)


def test_samples_leave_inference_mode_through_to(tmp_path, toy_flux):
    ds = load_dataset(str(make_folder(tmp_path)), max_pixels=64 * 64)
    with torch.inference_mode():  # as inside a ComfyUI node
        samples = encode(ds, toy_flux, EncodingCache())
    assert samples[0].latent.is_inference()
    moved = samples[0].to(dtype=torch.float64)
    assert not moved.latent.is_inference() and moved.latent.dtype == torch.float64
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    (moved.latent * weight).sum().backward()  # autograd accepts it
    assert weight.grad is not None
    assert os.path.basename(ds.records[0].image_path) == "im0.png"


def test_memory_limit_evicts_least_recent_and_shared_cache(tmp_path, toy_flux):
    cache = EncodingCache(max_memory_bytes=3 * 4 * 1000)  # room for three 1000-float entries
    for i in range(4):
        cache.put("text", f"k{i}", {"cond": torch.full((1000,), float(i))})
    assert list(cache.memory) == ["text/k1", "text/k2", "text/k3"] and cache.memory_bytes == 12000
    assert cache.get("text", "k1") is not None  # k1 becomes the most recent ...
    cache.put("text", "k4", {"cond": torch.zeros(1000)})
    assert list(cache.memory) == ["text/k3", "text/k1", "text/k4"]  # ... so k2 went first
    assert cache.get("text", "k0") is None and cache.misses == 1

    # The process-wide caches: one per directory; a second "run" reuses the first one's entries.
    images = torch.rand(2, 32, 32, 3)  # fresh content: nothing of it can be cached yet
    ds = dataset_from_images(images, (images[:1, ..., 0] > 0.5).float(), f"caption {images.sum().item()}", "x\n-")
    first = shared_cache(None)
    assert shared_cache() is first and shared_cache(str(tmp_path / "c")) is shared_cache(str(tmp_path / "c"))
    assert shared_cache(str(tmp_path / "c")) is not first
    before = dict(first.encoder_calls)
    encode(ds, toy_flux, shared_cache())
    calls = dict(first.encoder_calls)
    assert calls["vae_images"] == before["vae_images"] + 2 and calls["text"] == before["text"] + 2  # the caption and "x"
    encode(ds, toy_flux, shared_cache())
    assert shared_cache().encoder_calls == calls
