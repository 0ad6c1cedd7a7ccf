"""Training nodes: LoRA settings and the in-process EliGen LoRA trainer.

``EliGenTrain`` builds a training job from its inputs (training/job.py) and runs it with the runner the
command line uses too (training/runner.py), with ComfyUI's progress bar, previews and Cancel as hooks;
the LoRA goes into models/loras atomically, and the node returns a MODEL with it applied through the
stock LoRA path, so it samples with the stock KSampler at once and stacks with other LoRAs.
"""

import logging
import os

import numpy as np
import torch

from comfy_api.latest import io

from ..core import host
from ..core.lora_formats import load_lora
from ..training.hooks import Hooks
from ..training.job import DatasetSpec, EncodingSettings, OutputSettings, TrainingJob
from ..training.lora import LoraSettings
from ..training.outputs import node_folders
from ..training.progress import encoding_progress
from ..training.run_file import export_run
from ..training.runner import JobInputs, image_of, run_job
from ..training.settings import TrainSettings
from .settings_inputs import setting_input, setting_inputs, settings_from_inputs

CATEGORY = "EliGen/training"
LoraConfig = io.Custom("ELIGEN_LORA_CONFIG")
Dataset = io.Custom("ELIGEN_DATASET")
Entities = io.Custom("ELIGEN_ENTITIES")


class EliGenLoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenLoraConfig",
            display_name="EliGen LoRA Config",
            category=CATEGORY,
            description="Which layers get a LoRA and how it is shaped. The reference EliGen recipe: rank 32, "
                        "alpha 32, no dropout, preset 'eligen'.",
            inputs=[*setting_inputs(LoraSettings), *setting_inputs(LoraSettings, optional=True)],
            outputs=[LoraConfig.Output(display_name="lora_config")],
        )

    @classmethod
    def execute(cls, rank, alpha, dropout, init, preset, dtype, custom_pattern="") -> io.NodeOutput:
        settings = LoraSettings(rank=rank, alpha=alpha, dropout=dropout, init=init, preset=preset,
                                custom_pattern=custom_pattern or "", dtype=dtype)
        return io.NodeOutput(settings.validate())


class EliGenTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenTrain",
            display_name="EliGen Train LoRA",
            category=CATEGORY,
            description="Trains an EliGen LoRA in this ComfyUI process with the regional entity attention active, "
                        "saves it into models/loras and returns the model with it applied. Cancel stops within "
                        "one step and keeps a checkpoint; 'resume' continues a run.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.1 (dev/schnell) or Qwen-Image from the stock loaders. It is "
                               "not modified: other branches of the graph keep seeing the base model."),
                io.Clip.Input("clip", tooltip="The model's text encoder (entity and global prompts)."),
                io.Vae.Input("vae", tooltip="The model's VAE (images to latents, and validation images)."),
                Dataset.Input("dataset", tooltip="From EliGen Dataset: images, captions, entity prompts and masks."),
                LoraConfig.Input("lora_config", tooltip="From EliGen LoRA Config."),
                setting_input(OutputSettings, "lora_name"),
                *setting_inputs(TrainSettings),
                io.String.Input("resume", default="",
                                tooltip="Empty: a new run. 'latest': continue the last checkpoint of this lora_name. "
                                        "Or a checkpoint file name such as step_000250.safetensors."),
                setting_input(OutputSettings, "write_reference_format"),
                setting_input(EncodingSettings, "cache"),
                setting_input(EncodingSettings, "entity_text_length"),
                io.Conditioning.Input("validation_positive", optional=True,
                                      tooltip="Global prompt of the validation image (default: the first record's)."),
                Entities.Input("validation_entities", optional=True,
                               tooltip="Entities of the validation image (default: the first record's)."),
                *setting_inputs(TrainSettings, optional=True),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied."),
                io.String.Output(display_name="lora_name", tooltip="The saved file, as LoraLoader lists it."),
                io.Image.Output(display_name="loss_graph"),
                io.Image.Output(display_name="validation_images"),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, lora_config, lora_name, resume, write_reference_format, cache,
                entity_text_length, validation_positive=None, validation_entities=None,
                **settings) -> io.NodeOutput:
        job = node_job(dataset, lora_config, settings_from_inputs(TrainSettings, settings), lora_name,
                       write_reference_format, cache, entity_text_length)
        result = run_training(job, JobInputs(model, clip, vae, dataset, validation_positive, validation_entities),
                              resume=resume, node_id=cls.hidden.unique_id, graph=cls.hidden.prompt)
        # the page's EliGen extension (web/) refreshes the LoRA lists when it sees this
        saved = {"eligen_lora_saved": (result["lora_name"],)}
        return io.NodeOutput(result["model"], result["lora_name"], result["loss_graph"], result["validation"], ui=saved)


# ---------------------------------------------------------------------------------------------------
# The work behind the node (plain functions)


def node_job(dataset, lora_settings, settings, lora_name, write_reference_format=False, cache="memory",
             entity_text_length="padded_512"):
    """The training job of the node's inputs (its model, clip and vae come from the graph, not loaders)."""
    return TrainingJob(dataset=DatasetSpec(getattr(dataset, "root", None), int(dataset.max_pixels)),
                       lora=lora_settings, train=settings,
                       encoding=EncodingSettings(cache, entity_text_length),
                       output=OutputSettings(lora_name, bool(write_reference_format)))


def run_training(job, inputs, resume="", node_id=None, graph=None):
    """Run the node's job with ComfyUI's progress bar, previews and Cancel; the LoRA goes to models/loras
    and the output MODEL has it applied. ``graph`` (the API prompt) lets the run file be written."""
    resume = (resume or "").strip()
    folders = node_folders(job.output.lora_name, host.files.lora_folder(), host.files.output_directory())
    graph_validation = inputs.validation_positive is not None or inputs.validation_entities is not None

    def started(job, run_dir):  # run.json beside the checkpoints, for scripts/train.py (headless, torchrun)
        if graph is not None:
            export_run(run_dir, graph, node_id, job, graph_validation)

    done = run_job(job, inputs, folders, node_hooks(job.train.steps, node_id, started), resume or None)
    # The same path as the stock LoraLoaderModelOnly: read the file back, patch a clone.
    trained = host.weights.apply_lora(inputs.model.clone(), load_lora(done.lora_path), 1.0)
    images = [images for _, images in done.result.validation]
    return {
        "model": trained,
        "lora_name": os.path.basename(done.lora_path),
        "loss_graph": pil_to_image(done.loss_graph),
        "validation": torch.cat(images) if images else torch.zeros(1, 64, 64, 3),
        "result": done.result,
        "path": done.lora_path,
    }


def node_hooks(steps, node_id, started=None):
    """The node's progress bar (with the validation preview), a text line under the node, Cancel."""
    bar = host.files.progress_bar(steps, node_id=node_id)

    def preview(step, images):
        bar.update_absolute(step, steps, ("JPEG", image_of(images[-1]), 512))

    def progress(step, total, loss, seconds_left):
        bar.update_absolute(step, total)
        text = f"step {step}/{total}  loss {loss:.4f}  ~{seconds_left / 60:.1f} min left"
        logging.info("EliGen training: %s", text)
        host.files.send_progress_text(text, node_id)  # no server (plain use): the log line is enough

    return Hooks(progress=progress, preview=preview, check_cancel=host.files.interrupt_check(),
                 encoding_progress=encoding_progress(node_id), started=started)


def pil_to_image(image):
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


NODES = [EliGenLoraConfig, EliGenTrain]
