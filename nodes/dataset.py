"""Dataset nodes: an EliGen training dataset from a folder or from graph inputs (ELIGEN_DATASET)."""

import os

from comfy_api.latest import io

from ..core import host
from ..training.dataset import DEFAULT_MAX_PIXELS, MAX_MAX_PIXELS, SIDE_MULTIPLE, dataset_fingerprint, dataset_from_images, load_dataset

ELIGEN_DATASET = io.Custom("ELIGEN_DATASET")


def _max_pixels_input():
    return io.Int.Input(
        "max_pixels", default=DEFAULT_MAX_PIXELS, min=SIDE_MULTIPLE * SIDE_MULTIPLE, max=MAX_MAX_PIXELS, step=1,
        tooltip="Images larger than this many pixels are shrunk (aspect kept), then both sides are floored "
                "to a multiple of 16 and centre-cropped. 1048576 = 1024x1024, the reference setting.")


def resolve_folder(folder: str) -> str:
    """An absolute folder as given, else one relative to ComfyUI's input directory."""
    folder = folder.strip()
    if not folder:
        raise ValueError("folder is empty: give a dataset folder (absolute, or relative to ComfyUI's input directory)")
    return folder if os.path.isabs(folder) else os.path.join(host.files.input_directory(), folder)


def _dataset_outputs():
    """Both dataset nodes output the checked dataset and a one-line summary of it."""
    return [
        ELIGEN_DATASET.Output(display_name="dataset"),
        io.String.Output(display_name="summary", tooltip="Record, entity and size counts."),
    ]


class EliGenDatasetNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenDataset",
            display_name="EliGen Dataset (folder)",
            category="EliGen/training",
            description="Reads an EliGen dataset folder (metadata.json or metadata.jsonl, as the reference trainer "
                        "uses) and checks every record before training; all problems are reported at once.",
            inputs=[
                io.String.Input(
                    "folder", default="eligen_dataset",
                    tooltip="Dataset folder, absolute or relative to ComfyUI's input directory. It holds metadata.json "
                            "(a list of records) or metadata.jsonl (one record per line): image, prompt, "
                            "eligen_entity_prompts, eligen_entity_masks; paths relative to the folder."),
                _max_pixels_input(),
            ],
            outputs=_dataset_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, folder, max_pixels):
        # Re-run when the metadata or a file it names changes; ComfyUI would otherwise reuse the old output.
        try:
            return (dataset_fingerprint(resolve_folder(folder)), max_pixels)
        except ValueError:
            return float("nan")  # never equal to itself: re-run and show the error

    @classmethod
    def execute(cls, folder, max_pixels) -> io.NodeOutput:
        dataset = load_dataset(resolve_folder(folder), max_pixels)
        return io.NodeOutput(dataset, dataset.summary())


class EliGenDatasetFromImagesNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EliGenDatasetFromImages",
            display_name="EliGen Dataset (from images)",
            category="EliGen/training",
            description="Builds an EliGen dataset from an IMAGE batch, a MASK batch and prompts in the graph.",
            inputs=[
                io.Image.Input("images", tooltip="The training images, one batch of the same size."),
                io.String.Input(
                    "prompts", multiline=True, default="",
                    tooltip="Global captions, one per line: one line per image, or a single line for all images."),
                io.String.Input(
                    "entity_prompts", multiline=True, default="",
                    tooltip="Entity prompts: one line per image, entities separated by '|' (e.g. 'red circle | blue "
                            "square'); '-' or an empty line means no entities. A single line applies to every image. "
                            "Leave empty for plain samples."),
                io.Mask.Input(
                    "masks", optional=True,
                    tooltip="Entity masks (white = entity), image size, in order: image 0's entities first, "
                            "then image 1's, and so on. The count must equal the number of entity prompts."),
                _max_pixels_input(),
            ],
            outputs=_dataset_outputs(),
        )

    @classmethod
    def execute(cls, images, prompts, entity_prompts, max_pixels, masks=None) -> io.NodeOutput:
        dataset = dataset_from_images(images, masks, prompts, entity_prompts, max_pixels)
        return io.NodeOutput(dataset, dataset.summary())


NODES = [EliGenDatasetNode, EliGenDatasetFromImagesNode]
