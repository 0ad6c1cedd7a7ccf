"""The one function that runs a training job, for the node and the command line alike.

``run_job(job, inputs, folders, hooks, resume, distributed)``: check every output before any work
(training/outputs.py), encode the dataset (cached), release the text encoder and the VAE, train,
then (the writing rank only) save the LoRA with its metadata (and the reference format when asked),
``loss.png`` and the validation images. The front-ends only build the job and the hooks: the node from
its inputs (nodes/training.py), the command line from a run file (training/headless.py).
"""

import os
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image

from ..core import host
from ..core.adapters import adapter_for
from ..core.conditioning import TEXT_LENGTHS
from ..core.files import atomic_path
from ..core.lora_formats import save_lora, to_reference
from . import distributed as dist_lib
from .cache import cache_for_mode, encode_dataset, encode_text
from .hooks import Hooks
from .loop import CheckpointFolder, TrainingData, train
from .loss_plot import loss_graph
from .outputs import prepare_outputs
from .peft_requirement import import_peft
from .validation import decode_and_release, validation_sample


@dataclass
class JobInputs:
    """What a job trains on, loaded: the node gets them from the graph, the command line from loaders."""
    model: object                       # the MODEL (ModelPatcher); left unmodified
    clip: object                        # text encoder (comfy.sd.CLIP)
    vae: object                         # comfy.sd.VAE
    dataset: object                     # training.dataset.EliGenDataset
    validation_positive: list | None = None  # a CONDITIONING for the validation image (node only)
    validation_entities: tuple | None = None  # ELIGEN_ENTITIES for the validation image (node only)


@dataclass
class JobResult:
    job: object                 # the job as run (its lora_name made plain)
    result: object              # training.loop.TrainResult
    lora_path: str | None       # the saved LoRA; None on ranks that do not write
    loss_graph: object          # PIL image of the loss curve


def run_job(job, inputs, folders, hooks=None, resume=None, distributed=None):
    """Run ``job`` (training/job.py) on ``inputs`` writing into ``folders`` (training/outputs.py).
    ``resume``: None, "latest" or a checkpoint file name; ``distributed``: a torchrun Group or None."""
    import_peft()  # before any work: without peft the run would fail after encoding the whole dataset
    hooks = hooks or Hooks()
    adapter = adapter_for(inputs.model)
    job.validate(adapter)
    name = prepare_outputs(job.output.lora_name, folders, resume, job.train.steps, job.output.write_reference_format)
    job = replace(job, output=replace(job.output, lora_name=name))
    if hooks.started is not None:
        hooks.started(job, folders.run)

    samples, empty = _encode(job, inputs, folders, hooks, distributed)
    hooks.log(inputs.dataset.summary())
    release_encoders(inputs.clip, inputs.vae)  # every sample is encoded: the GPU is for the steps
    validation = []
    if job.train.validation_every:
        validation = [validation_sample(samples[0], inputs.validation_positive, inputs.validation_entities,
                                        adapter.latent_scale)]
    world = 1 if distributed is None else distributed.world
    info = {"lora_name": name, "global_batch": job.train.batch_size * world * job.train.grad_accumulation}
    data = TrainingData(samples, validation, empty, decode=lambda latent: decode_and_release(inputs.vae, latent))
    folder = CheckpointFolder(folders.run, resume or None, info)
    result = train(inputs.model, data, job.lora, job.train, folder, hooks, distributed)

    graph = loss_graph(result.losses)
    if distributed is not None and not distributed.is_writer:
        return JobResult(job, result, None, graph)
    path = _save_lora(job, adapter, result, folders.loras)
    _save_image(graph, os.path.join(folders.run, "loss.png"))
    for step, images in result.validation:
        for index, image in enumerate(images):
            _save_image(image_of(image), os.path.join(folders.run, f"validation_{step:06d}_{index}.png"))
    return JobResult(job, result, path, graph)


def _encode(job, inputs, folders, hooks, distributed):
    """(samples, empty prompt condition); under torchrun through the shared disk cache."""
    options = dict(latent_format=inputs.model,
                   entity_tokenizer_options=TEXT_LENGTHS[job.encoding.entity_text_length])
    with torch.inference_mode():  # as ComfyUI runs nodes: the encoders see the same mode on every path
        if distributed is not None:  # one shared disk cache: each entry encoded once, by its owner rank
            samples = dist_lib.encode_shared(inputs.dataset, inputs.vae, inputs.clip, distributed, folders.cache,
                                             **options)[0]
        else:
            samples = encode_dataset(inputs.dataset, inputs.vae, inputs.clip,
                                     cache=cache_for_mode(job.encoding.cache, folders.cache),
                                     progress=hooks.encoding_progress, **options)
        return samples, encode_text(inputs.clip, "")


def _save_lora(job, adapter, result, folder):
    """``<name>.safetensors`` (ComfyUI keys) and, when asked, ``<name>_reference.safetensors``; the
    metadata records the family, the settings, the steps done and the last loss."""
    name = job.output.lora_name
    metadata = {"eligen_training": {"family": adapter.family, "lora": job.lora.to_dict(),
                                    "train": asdict(job.train), "steps_done": result.step,
                                    "final_loss": result.losses[-1][1] if result.losses else None}}
    path = save_lora(os.path.join(folder, name + ".safetensors"), result.lora, metadata)
    if job.output.write_reference_format:
        save_lora(os.path.join(folder, name + "_reference.safetensors"),
                  to_reference(result.lora, adapter.lora_reference_format),
                  {**metadata, "eligen_format": adapter.lora_reference_format})
    return path


def release_encoders(clip, vae):
    """Unload the text encoder and the VAE from ComfyUI's loaded models (they go to their offload device)."""
    for patcher in (getattr(clip, "patcher", None), getattr(vae, "patcher", None)):
        if patcher is not None:
            host.memory.unload_model(patcher)


def image_of(pixels):
    """A PIL image of one IMAGE [H, W, 3] float in [0, 1]."""
    return Image.fromarray((pixels.clamp(0, 1).cpu().numpy() * 255).round().astype("uint8"))


def _save_image(image, path):
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")
