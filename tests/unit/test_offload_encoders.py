"""Nothing else on the device during training steps: after encoding, the text encoder and the VAE are
unloaded through ComfyUI's model management (its own ``current_loaded_models``), the VAE comes back only
for validation images, and block swap keeps the diffusion model out of ComfyUI's loaded list too."""

import pytest

import comfy.model_management
from comfyui_eligen.core import host
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import lora
from comfyui_eligen.training.cache import EncodingCache, encode_dataset
from comfyui_eligen.training.hooks import Hooks
from comfyui_eligen.training.loop import TrainingData, train
from comfyui_eligen.training.runner import release_encoders
from comfyui_eligen.training.settings import TrainSettings
from comfyui_eligen.training.validation import decode_and_release

from test_training_node import toy_dataset

DEVICE = comfy.model_management.get_torch_device()


def loaded():
    """The ModelPatchers ComfyUI's model management holds loaded on the device (its own list)."""
    return [entry.model for entry in comfy.model_management.current_loaded_models
            if entry.device == DEVICE and entry.model is not None]


def holds(patcher):
    return any(m is patcher for m in loaded())


@pytest.mark.parametrize("blocks_to_swap", [-1, 1])
def test_encoders_leave_the_device_for_the_steps(blocks_to_swap):
    model, clip, vae = load_toy_models("flux", "random", seed=0)
    samples = encode_dataset(toy_dataset(), vae, clip, latent_format=model, cache=EncodingCache(None))
    assert holds(clip.patcher) and holds(vae.patcher)  # encoding loaded them
    release_encoders(clip, vae)
    assert not holds(clip.patcher) and not holds(vae.patcher)

    # Something else loaded on the device before training (e.g. the VAE again) is unloaded by train().
    comfy.model_management.load_models_gpu([vae.patcher])
    assert holds(vae.patcher)
    during = []

    def check(*_):
        during.append([type(m.model).__name__ for m in loaded()])

    decoded = []

    def decode(latent):
        images = decode_and_release(vae, latent)
        decoded.append((images.shape, holds(vae.patcher)))
        return images

    settings = TrainSettings(steps=2, validation_every=1, validation_steps=1, blocks_to_swap=blocks_to_swap)
    result = train(model, TrainingData(samples, samples[:1], decode=decode), lora.LoraSettings(rank=2, alpha=2),
                   settings, hooks=Hooks(check_cancel=check, progress=check))
    assert result.step == 2 and len(during) == 4
    # during steps ComfyUI holds only the diffusion model (stock loading) or nothing (block swap loads it itself)
    expected = [] if blocks_to_swap >= 0 else ["Flux"]
    assert all(names == expected for names in during), during
    # validation decoded real images, and the VAE left again right after
    assert [d[0][-1] for d in decoded] == [3, 3] and not any(d[1] for d in decoded)


def test_memory_contact_points_are_checked():
    """The contact points block swap and unloading use are in the start-up check, and a missing one is
    refused by name (not an AttributeError)."""
    assert host.memory.MEMORY_MANAGEMENT in host.CONTACTS and host.memory.PATCH_ON_OFFLOAD in host.CONTACTS
    assert not [p for p in host.missing_capabilities() if p.contact in (host.memory.MEMORY_MANAGEMENT, host.memory.PATCH_ON_OFFLOAD)]
    saved = comfy.model_management.free_memory
    del comfy.model_management.free_memory
    try:
        with pytest.raises(host.MissingCapability, match="free_memory") as error:
            host.memory.unload_models_on(DEVICE)
        assert error.value.contact == host.memory.MEMORY_MANAGEMENT
    finally:
        comfy.model_management.free_memory = saved
