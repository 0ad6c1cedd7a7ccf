"""Toy world nodes: tiny models that run the whole EliGen job on a CPU, layouts, a training set and a placement
metric."""

import os

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..core import host
from ..core import conditioning as entity_conds
from ..toyworld import data, files, metric, models, score_card
from ..training.dataset import dataset_fingerprint, load_dataset
from .dataset import ELIGEN_DATASET

CATEGORY = "EliGen/toy world"
Entities = io.Custom("ELIGEN_ENTITIES")
TOY_DATASET_FOLDER = "eligen_toy_train"  # what EliGen Toy Dataset writes, inside ComfyUI's input folder


def toy_dataset_path(folder):
    """``folder`` inside ComfyUI's input directory; a name that would leave it is refused, naming it."""
    name = folder.strip().rstrip("/\\")
    parts = name.replace("\\", "/").split("/")
    if not name or os.path.isabs(name) or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"folder {folder!r}: give a folder name inside ComfyUI's input directory "
                         "(no absolute path, no '.' or '..', no empty part)")
    return os.path.join(host.files.input_directory(), *parts)


class EliGenToyModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenToyModelLoader",
            display_name="EliGen Toy Model Loader",
            category=CATEGORY,
            description="Tiny FLUX or Qwen-Image model, toy text encoder and toy VAE built from ComfyUI's "
            "own classes; the stock text-encode, sampler and VAE nodes work on them.",
            inputs=[
                io.Combo.Input("family", options=sorted(models.FAMILIES), default="flux",
                               tooltip="Architecture of the tiny diffusion model."),
                io.Combo.Input("weights", options=["pretrained", "random"], default="pretrained",
                               tooltip="pretrained: the shipped base model (trained on global captions only); "
                               "random: a fresh deterministic initialisation from the seed."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random initialisation (ignored for pretrained weights)."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family, weights, seed) -> io.NodeOutput:
        return io.NodeOutput(*models.load_toy_models(family, weights, seed))


class EliGenToyLayouts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenToyLayouts",
            display_name="EliGen Toy Layouts",
            category=CATEGORY,
            description="Synthetic layouts (1-4 coloured shapes) as lists: downstream nodes run once per layout.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder for the entity prompts (the toy model's CLIP)."),
                io.Combo.Input("split", options=sorted(data.SPLITS), default="heldout",
                               tooltip="heldout: layouts never used for training; train: the training stream."),
                io.Int.Input("count", default=8, min=1, max=4096,
                             tooltip="How many layouts (the lists' length)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Layout seed; layout i is the same for the same split, seed and i."),
                io.Int.Input("start", default=0, min=0, max=2**31 - 1,
                             tooltip="Index of the first layout."),
                io.Combo.Input("text_length", options=list(entity_conds.TEXT_LENGTHS), default="real_length",
                               tooltip="Entity prompt length (as in EliGen Entity); the toy world trains "
                               "with real_length."),
                io.Int.Input("size", default=data.SIZE, min=64, max=1024, step=16, optional=True,
                             tooltip=f"Image side in px; match EmptyLatentImage. {data.SIZE}: 16x16 image tokens "
                             f"(the toy world's default); {data.QUICK_SIZE}: 8x8 tokens, about 4x cheaper to train."),
            ],
            outputs=[
                io.String.Output(display_name="prompt", is_output_list=True,
                                 tooltip="Global caption per layout."),
                Entities.Output(display_name="entities", is_output_list=True,
                                tooltip="The layout's entities (prompt + mask each)."),
                io.Int.Output(display_name="noise_seed", is_output_list=True,
                              tooltip="A sampling seed per layout (seed * 100003 + index)."),
                io.Image.Output(display_name="ground_truth", is_output_list=True,
                                tooltip="The layout drawn exactly, for reference."),
            ],
        )

    @classmethod
    def execute(cls, clip, split, count, seed, start, text_length, size=data.SIZE) -> io.NodeOutput:
        encode = lambda text: entity_conds.encode_entity_text(clip, text, text_length)
        items = data.layouts(split, seed, count, start, size)
        return io.NodeOutput(
            [item.caption for item in items],
            [data.layout_entities(item, encode) for item in items],
            [seed * 100003 + start + i for i in range(count)],
            [torch.from_numpy(item.image.astype(np.float32) / 255.0)[None] for item in items],
        )


class EliGenPlacementMetric(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenPlacementMetric",
            display_name="EliGen Placement Metric",
            category=CATEGORY,
            description="Per entity: IoU between where its colour appears and its mask, share of its colour "
            "outside the mask, success (IoU > 0.5). Entities of one colour are told apart by their masks (a "
            "pixel outside all of them counts for the nearest). For toy-world images (palette colours). The "
            "node shows the score as a picture; the summary output carries it as text.",
            is_input_list=True,
            is_output_node=True,
            inputs=[
                io.Image.Input("images", tooltip="Generated images, one batch per layout (a list)."),
                Entities.Input("entities", tooltip="The entities each image was generated with (a list)."),
                io.String.Input("filename_prefix", default="eligen_placement",
                                tooltip="Writes <output>/<prefix>_NNNNN_.json with every figure; empty: no file."),
            ],
            outputs=[
                io.String.Output(display_name="summary", tooltip="One line: mean IoU, success rate, leak."),
                io.Float.Output(display_name="mean_iou", tooltip="Mean IoU over all entities."),
                io.Float.Output(display_name="success_rate", tooltip="Share of entities with IoU > 0.5."),
            ],
        )

    @classmethod
    def execute(cls, images, entities, filename_prefix) -> io.NodeOutput:
        result = metric.score_entity_batches(images, entities)
        summary = metric.format_summary(result["summary"])
        prefix = (filename_prefix[0] if filename_prefix else "").strip()
        if prefix:
            folder, name, counter = host.files.save_image_path(prefix, host.files.output_directory())
            files.write_json(os.path.join(folder, f"{name}_{counter:05}_.json"), result)
        figures = result["summary"]
        card = torch.from_numpy(score_card.score_card(figures, len(result["images"])).astype(np.float32) / 255.0)[None]
        shown = {**ui.PreviewImage(card, cls=cls).as_dict(), **ui.PreviewText(summary).as_dict()}
        return io.NodeOutput(summary, figures["mean_iou"], figures["success_rate"], ui=shown)


class EliGenToyDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenToyDataset",
            display_name="EliGen Toy Dataset",
            category=CATEGORY,
            description="The toy world's synthetic training set (1-4 coloured shapes per image, one prompt and one "
            "mask per shape), written into a folder of ComfyUI's input directory in the reference metadata "
            "format when that folder does not hold it yet, then read and checked as EliGen Dataset (folder) "
            "reads any dataset.",
            inputs=[
                io.String.Input("folder", default=TOY_DATASET_FOLDER,
                                tooltip="Folder inside ComfyUI's input directory. Written only if new, empty or "
                                "written by this node before; a folder of yours is never written into."),
                io.Int.Input("count", default=512, min=1, max=100_000,
                             tooltip="How many training layouts (images)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Layout seed; the same seed and count give the same files."),
                io.Int.Input("size", default=data.SIZE, min=64, max=1024, step=16,
                             tooltip=f"Image side in px. {data.SIZE}: the toy world's 16x16 image tokens; "
                             f"{data.QUICK_SIZE}: 8x8 tokens, about 4x cheaper to train."),
            ],
            outputs=[
                ELIGEN_DATASET.Output(display_name="dataset"),
                io.String.Output(display_name="summary", tooltip="Record, entity and size counts."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, count, seed, size):
        # Re-run when the files changed or went away (the dataset reads its images from disk).
        try:
            return (dataset_fingerprint(toy_dataset_path(folder)), count, seed, size)
        except ValueError:
            return float("nan")  # never equal to itself: run and write the folder

    @classmethod
    def execute(cls, folder, count, seed, size) -> io.NodeOutput:
        path = toy_dataset_path(folder)
        data.ensure_dataset(path, count, seed, size)
        dataset = load_dataset(path, max_pixels=size * size)
        return io.NodeOutput(dataset, dataset.summary())


NODES = [EliGenToyModelLoader, EliGenToyLayouts, EliGenToyDataset, EliGenPlacementMetric]
