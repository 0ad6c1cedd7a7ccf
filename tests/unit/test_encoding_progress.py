"""The encoding stage of training reports progress on its node through ComfyUI's own progress hook and
stops on Cancel (ComfyUI's interrupt flag) between encoder calls, keeping what it encoded."""

import pytest

import comfy.model_management
import comfy.utils
from comfyui_eligen.toyworld import data
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training.cache import EncodingCache, encode_dataset
from comfyui_eligen.training.dataset import load_dataset
from comfyui_eligen.training.progress import encoding_progress

RECORDS = 24


@pytest.fixture
def hook():
    """ComfyUI's global progress hook (what the server installs), recording every update."""
    calls = []
    old = comfy.utils.PROGRESS_BAR_HOOK

    def record(value, total, preview, node_id=None):
        calls.append((value, total, node_id))
        if calls and record.cancel_at is not None and len(calls) == record.cancel_at:
            comfy.model_management.interrupt_current_processing(True)  # the user presses Cancel

    record.cancel_at = None
    comfy.utils.set_progress_bar_global_hook(record)
    yield record, calls
    comfy.utils.set_progress_bar_global_hook(old)
    comfy.model_management.interrupt_current_processing(False)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("encoding")
    data.write_dataset(str(folder), RECORDS, seed=1, split="train")
    return load_dataset(str(folder)), load_toy_models("flux", "random", seed=0)


def test_encoding_moves_the_node_progress_bar(toy, hook):
    dataset, (model, clip, vae) = toy
    _, calls = hook
    cache = EncodingCache()
    samples = encode_dataset(dataset, vae, clip, latent_format=model, cache=cache, vae_batch_size=4,
                             progress=encoding_progress("17"))
    assert len(samples) == RECORDS
    encoder_calls = cache.encoder_calls["vae"] + cache.encoder_calls["text"]
    assert len(calls) >= encoder_calls >= RECORDS // 4 + 1
    assert {node for _, _, node in calls} == {"17"}
    values = [value for value, _, _ in calls]
    assert values == sorted(values) and values[-1] == calls[-1][1]  # fills up to the total, never back


def test_cancel_stops_encoding_and_keeps_what_was_encoded(toy, hook):
    dataset, (model, clip, vae) = toy
    record, calls = hook
    record.cancel_at = 3
    cache = EncodingCache()
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        encode_dataset(dataset, vae, clip, latent_format=model, cache=cache, vae_batch_size=4,
                       progress=encoding_progress("17"))
    # Cancel came after the 3rd batch of 4 images; the batch already running finishes (and is cached),
    # the check after it stops the run before any text is encoded
    assert len(calls) == 3
    assert cache.encoder_calls["vae_images"] == 16 and cache.encoder_calls["text"] == 0
    # the next run encodes only the rest
    record.cancel_at = None
    encode_dataset(dataset, vae, clip, latent_format=model, cache=cache, vae_batch_size=4,
                   progress=encoding_progress("17"))
    assert cache.encoder_calls["vae_images"] == RECORDS
