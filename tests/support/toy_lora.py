"""One trained toy EliGen LoRA per family per test session, shared by the tests that need one: the lab's
training test (does training place entities?) and the server tests that need a trained LoRA (painted
layouts, the browser test). Trained in-process with the project's trainer on the shipped toy base, then,
for a server, written into its models/loras."""

import os

import torch

from comfyui_eligen.core.lora_formats import save_lora
from comfyui_eligen.lab import evaluate
from comfyui_eligen.lab.workflows import LORA_NAME
from comfyui_eligen.toyworld import data, models

TRAIN = dict(steps=150, batch_size=16, learning_rate=5e-3, rank=8, warmup_steps=10, count=256, size=data.QUICK_SIZE)
DATA_SEED = 3
# Qwen-Image's toy LoRA (used by the lab's training test only) takes half the steps: at 75 steps it already
# beats (a) and (b) by 0.49 IoU and 52 points of success on the test's layouts, and the same 75-step run
# with the masks dropped scores 0.006 / 0%, so the comparison still tells a trainer that loses the masks.
STEPS = {"flux": TRAIN["steps"], "qwen_image": 75}


def recipe(family):
    """TRAIN with ``family``'s steps."""
    return dict(TRAIN, steps=STEPS[family])


_trained = {}
_encoded = {}


def toy_training_samples(family="flux"):
    """The training set of TRAIN (data seed DATA_SEED) encoded by the shipped toy ``family``, once per
    session: the toy LoRA and the lab's negative control (the same run with the masks dropped) train on it."""
    if family not in _encoded:
        model, clip, vae = models.load_toy_models(family, "pretrained")
        _encoded[family] = evaluate.training_samples(model, clip, vae, TRAIN["count"], DATA_SEED, TRAIN["size"])
    return _encoded[family]


def toy_lora_state(family="flux"):
    """``(lora, losses, base_untouched)``: the toy EliGen LoRA of ``family`` trained on the shipped toy base
    with ``recipe(family)`` (seed 0, data seed DATA_SEED), once per session; ``base_untouched`` says
    whether the base model's weights were bit-identical after training (the lab's training test asserts it)."""
    if family not in _trained:
        # one thread, as the autouse fixture gives tests (module fixtures run before it): several
        # threads on busy cores make tiny-model steps many times slower
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            samples = toy_training_samples(family)
            model, clip, vae = models.load_toy_models(family, "pretrained")
            before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
            lora, losses, _ = evaluate.train_lora(model, clip, vae, seed=0, samples=samples, **recipe(family))
            after = model.model.diffusion_model.state_dict()
            untouched = all(torch.equal(before[k], after[k]) for k in before)
        finally:
            torch.set_num_threads(threads)
        _trained[family] = (lora, losses, untouched)
    return _trained[family]


def trained_toy_lora(server, name=LORA_NAME):
    """The LoRA file name in ``server.models_dir/loras`` (the session's FLUX toy LoRA, written once)."""
    path = os.path.join(server.models_dir, "loras", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_lora(path, toy_lora_state("flux")[0])
    return name
