"""One training job: what the EliGen Train node builds from its inputs, what a run file (``run.json``)
holds, and what training/runner.py runs.

``TrainingJob`` = how to load the model, text encoder and VAE (loader specs, for run files; the node
passes the loaded objects instead), the dataset, the LoRA settings, the training settings, the encoding
options and the output. Every field has its help text and limits in its metadata (training/fields.py);
``read_job(value, source)`` reads parsed JSON strictly, naming ``source`` and the field in every error.
"""

from dataclasses import MISSING, asdict, dataclass

from ..core.conditioning import TEXT_LENGTHS
from .dataset import DEFAULT_MAX_PIXELS, MAX_MAX_PIXELS, SIDE_MULTIPLE
from .fields import FieldError, part, problems, raise_problems, read_dataclass, setting
from .lora import LoraSettings
from .outputs import plain_lora_name
from .settings import TrainSettings

VERSION = 1
KIND = "eligen_training_run"
CACHE_MODES = ("memory", "disk", "off")

# Loader node -> (its inputs: required (None) or optional with their default, the output index of each
# component it gives). The toy world's loader gives all three; scripts/train.py knows how to call it.
LOADERS = {
    "EliGenToyModelLoader": ({"family": None, "weights": None, "seed": None}, {"model": 0, "clip": 1, "vae": 2}),
    "CheckpointLoaderSimple": ({"ckpt_name": None}, {"model": 0, "clip": 1, "vae": 2}),
    "UNETLoader": ({"unet_name": None, "weight_dtype": "default"}, {"model": 0}),
    "CLIPLoader": ({"clip_name": None, "type": None, "device": "default"}, {"clip": 0}),
    "DualCLIPLoader": ({"clip_name1": None, "clip_name2": None, "type": None, "device": "default"}, {"clip": 0}),
    "VAELoader": ({"vae_name": None}, {"vae": 0}),
}
COMPONENTS = ("model", "clip", "vae")


class RunFileError(ValueError):
    """A run file (or a graph being exported) that cannot be used; the message names the field."""


@dataclass
class LoaderSpec:
    loader: str = setting(MISSING, "The ComfyUI loader node that loads this component.", choices=tuple(LOADERS))
    inputs: dict = setting(MISSING, "That node's inputs (file names and options), as in the graph.")

    def field_problems(self):
        return problems(self, {"inputs": self._inputs_problem})

    def _inputs_problem(self, inputs):
        if self.loader not in LOADERS:
            return None  # reported on 'loader'
        wanted = LOADERS[self.loader][0]
        unknown = sorted(set(inputs) - set(wanted))
        if unknown:
            return f"inputs has unknown keys {', '.join(unknown)} for {self.loader} (it takes {', '.join(wanted)})"
        missing = [name for name, default in wanted.items() if default is None and name not in inputs]
        if missing:
            return f"inputs lacks {', '.join(missing)} for {self.loader}"
        return None

    def complete(self):
        """The inputs with the loader's defaults filled in."""
        wanted = LOADERS[self.loader][0]
        return LoaderSpec(self.loader, {name: self.inputs.get(name, default) for name, default in wanted.items()})

    def gives(self, component):
        return component in LOADERS[self.loader][1]


@dataclass
class DatasetSpec:
    folder: str | None = setting(None, "The dataset folder (absolute): metadata.json or metadata.jsonl and the "
                                       "files it names. None: images from the graph (no run file then).")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Images larger than this many pixels are shrunk (aspect kept), "
                                                  "then both sides are floored to a multiple of 16.",
                              min=SIDE_MULTIPLE * SIDE_MULTIPLE, max=MAX_MAX_PIXELS)

    def field_problems(self):
        return problems(self, {"folder": lambda v: None if v.strip() else "folder must be a non-empty path"})


@dataclass
class EncodingSettings:
    cache: str = setting("memory", "Encoded latents and prompts: memory (reused in this ComfyUI session), disk "
                                   "(also output/eligen_training/cache, reused across restarts), off.",
                         choices=CACHE_MODES)
    entity_text_length: str = setting("padded_512", "FLUX T5 length of entity prompts: padded_512 as the released "
                                                    "adapter, real_length for less attention work. Qwen-Image is "
                                                    "never padded.", choices=tuple(TEXT_LENGTHS))

    def field_problems(self):
        return problems(self)


def _name_problem(name):
    try:
        plain_lora_name(name)
    except ValueError as error:
        return str(error)
    return None


@dataclass
class OutputSettings:
    lora_name: str = setting("eligen_lora", "File name in models/loras (.safetensors is added) and the name of the "
                                            "checkpoint folder output/eligen_training/<name>.")
    write_reference_format: bool = setting(False, "Also write <name>_reference.safetensors in the reference's key "
                                                  "format (kohya keys for FLUX, peft keys for Qwen-Image).")

    def field_problems(self):
        return problems(self, {"lora_name": _name_problem})


@dataclass
class TrainingJob:
    model: LoaderSpec | None = setting(None, "How to load the diffusion model (run files; the node passes it).")
    clip: LoaderSpec | None = setting(None, "How to load the text encoder (run files; the node passes it).")
    vae: LoaderSpec | None = setting(None, "How to load the VAE (run files; the node passes it).")
    dataset: DatasetSpec = part(DatasetSpec, "The training records.")
    lora: LoraSettings = part(LoraSettings, "Which layers get a LoRA and its shape.")
    train: TrainSettings = part(TrainSettings, "The training settings, the seed among them.")
    encoding: EncodingSettings = part(EncodingSettings, "How the dataset is encoded and cached.")
    output: OutputSettings = part(OutputSettings, "The LoRA's name and formats.")

    def validate(self, adapter=None):
        """ValueError listing every problem of every part (the LoRA preset against ``adapter``'s)."""
        parts = {"dataset": self.dataset.field_problems(), "lora": self.lora.field_problems(adapter),
                 "train": self.train.field_problems(), "encoding": self.encoding.field_problems(),
                 "output": self.output.field_problems()}
        raise_problems("training job", {f"{name}.{key}": f"{name}: {message}"
                                        for name, found in parts.items() for key, message in found.items()})
        return self

    def to_run_file(self):
        """The run file's JSON object (a job whose model, clip, vae and dataset folder are known)."""
        return {"version": VERSION, "kind": KIND, **asdict(self)}


def read_job(value, source="run file"):
    """A TrainingJob from a run file's parsed JSON; RunFileError naming ``source`` and every bad field."""
    try:
        if not isinstance(value, dict):
            raise FieldError([("", f"expected a JSON object, got {type(value).__name__}")])
        if value.get("version") != VERSION:
            raise FieldError([("version", f"is {value.get('version')!r}; this package reads version {VERSION}")])
        if value.get("kind", KIND) != KIND:
            raise FieldError([("kind", f"is {value.get('kind')!r}, not {KIND!r}")])
        job = read_dataclass(TrainingJob, {k: v for k, v in value.items() if k not in ("version", "kind")})
        found = [(component, f"is missing: a run file names the loader of {', '.join(COMPONENTS)}")
                 for component in COMPONENTS if getattr(job, component) is None]
        found += [(f"{component}.loader", f"{spec.loader} does not give a {component}")
                  for component in COMPONENTS if (spec := getattr(job, component)) and not spec.gives(component)]
        if job.dataset.folder is None:
            found.append(("dataset.folder", "is missing: a run file trains on a dataset folder"))
        if found:
            raise FieldError(found)
    except FieldError as error:
        raise RunFileError(f"{source}: {error}") from None
    for component in COMPONENTS:
        setattr(job, component, getattr(job, component).complete())
    return job
