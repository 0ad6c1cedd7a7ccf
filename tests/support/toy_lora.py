"""One trained toy EliGen LoRA per test session, shared by the tests that need a trained LoRA in a real
server (painted layouts, the browser test): trained in-process with the project's trainer on the
shipped toy base (the toy-world training test's recipe), then written into the server's models/loras."""

import os

import torch

from comfyui_eligen.core.lora_formats import save_lora
from comfyui_eligen.lab import evaluate
from comfyui_eligen.lab.workflows import LORA_NAME
from comfyui_eligen.toyworld import data, models

TRAIN = dict(steps=150, batch_size=16, learning_rate=5e-3, rank=8, warmup_steps=10, count=256, size=data.QUICK_SIZE)
_trained = {}


def trained_toy_lora(server, name=LORA_NAME):
    """The LoRA file name in ``server.models_dir/loras`` (trained once per session, FLUX toy base)."""
    if "flux" not in _trained:
        # one thread, as the autouse fixture gives tests (module fixtures run before it): several
        # threads on busy cores make tiny-model steps many times slower
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, clip, vae = models.load_toy_models("flux", "pretrained")
            lora, _, _ = evaluate.train_lora(model, clip, vae, seed=0, data_seed=3, **TRAIN)
        finally:
            torch.set_num_threads(threads)
        _trained["flux"] = lora
    path = os.path.join(server.models_dir, "loras", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_lora(path, _trained["flux"])
    return name
