"""The toy world's API-format workflows, built in code so the shipped files, the demo and the tests
are the same graphs. `python scripts/toyworld.py workflows` rewrites the toy templates in
example_workflows/ (API graphs in api/, UI twins with their notes beside them).

    a: base model, global caption only
    b: base model + EliGen attention (entity prompts and masks), no LoRA
    c: train an EliGen LoRA in-process on the synthetic dataset (EliGen Toy Dataset writes it)
    d: base model + the trained LoRA + EliGen attention
    e: a painted layout picture with the trained LoRA (lab/painted.py)
"""

import importlib.util
import os
import subprocess
import sys

from ..toyworld.data import SIZE
from ..toyworld.files import write_json
from .evaluate import SAMPLER, TEXT_LENGTH, TRAIN_DEFAULTS, TRAIN_FIXED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO, "example_workflows")
LORA_NAME = "eligen_toy_flux.safetensors"  # what workflow c saves in models/loras
DATASET_FOLDER = "eligen_toy_train"  # inside ComfyUI's input directory
# The template file names. Both frontends (1.32.9 and 1.58.1) title a pack's template card with its file
# name and describe it with the same name, '-' and '_' read as spaces; the page extension (web/) sorts
# the cards by the number. Toy templates first (no downloads), the one that trains before those that
# load its LoRA.
TEMPLATE_NAMES = {
    "a": "EliGen 1 - toy, base model only",
    "b": "EliGen 2 - toy, entity attention",
    "c": "EliGen 3 - toy, train the LoRA",
    "d": "EliGen 4 - toy, with the LoRA from 3",
    "e": "EliGen 5 - toy, painted, LoRA from 3",
}
CONDITIONS = {
    "a": "base model, global caption only",
    "b": "base model + EliGen attention, no LoRA",
    "d": "base model + EliGen LoRA + EliGen attention",
}


def _link(node, output=0):
    return [str(node), output]


def score_text(metric_node):
    """The stock text display node showing the placement metric's summary line."""
    return {"class_type": "PreviewAny", "inputs": {"source": _link(metric_node, 0)},
            "_meta": {"title": "Placement score"}}


def sampling_workflow(condition, count=16, layout_seed=0, family="flux", lora_name=LORA_NAME,
                      prefix="eligen_toy", sampler=SAMPLER, weights="pretrained", size=SIZE):
    """Held-out layouts -> stock text encode / sampler / decode -> SaveImage + placement metric."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {sorted(CONDITIONS)}, not {condition!r}")
    name = f"{prefix}/{condition}"
    graph = {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": family, "weights": weights, "seed": 0}},
        "2": {"class_type": "EliGenToyLayouts", "inputs": {
            "clip": _link(1, 1), "split": "heldout", "count": count, "seed": layout_seed, "start": 0,
            "text_length": TEXT_LENGTH, "size": size}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": _link(2, 0), "clip": _link(1, 1)}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": _link(1, 1)}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": _link(1, 0), "seed": _link(2, 2), "steps": sampler["steps"], "cfg": sampler["cfg"],
            "sampler_name": sampler["sampler_name"], "scheduler": sampler["scheduler"],
            "positive": _link(3), "negative": _link(4), "latent_image": _link(5), "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": _link(6), "vae": _link(1, 2)}},
        "8": {"class_type": "SaveImage", "inputs": {"images": _link(7), "filename_prefix": name}},
        "9": {"class_type": "EliGenPlacementMetric", "inputs": {
            "images": _link(7), "entities": _link(2, 1), "filename_prefix": name}},
        "12": score_text(9),
    }
    model = _link(1, 0)
    if condition == "d":
        graph["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": lora_name, "strength_model": 1.0}}
        model = _link(10)
    if condition in ("b", "d"):
        graph["11"] = {"class_type": "EliGenApply", "inputs": {
            "model": model, "positive": _link(3), "entities": _link(2, 1), "negative": _link(4),
            "entities_on_negative": False, "start_percent": 0.0, "end_percent": 1.0}}
        graph["6"]["inputs"].update(model=_link(11, 0), positive=_link(11, 1), negative=_link(11, 2))
    return graph


def training_workflow(family="flux", dataset_folder=DATASET_FOLDER, lora_name=LORA_NAME, seed=0,
                      prefix="eligen_toy", size=SIZE, **train):
    """EliGenToyDataset (writes the synthetic set into the input folder) -> EliGenTrain -> the LoRA in
    models/loras; the loss graph saved."""
    settings = dict(TRAIN_DEFAULTS, **train)
    return {
        "1": {"class_type": "EliGenToyModelLoader", "inputs": {"family": family, "weights": "pretrained", "seed": 0}},
        "2": {"class_type": "EliGenToyDataset", "inputs": {
            "folder": dataset_folder, "count": settings["count"], "seed": seed, "size": size}},
        "3": {"class_type": "EliGenLoraConfig", "inputs": {
            "rank": settings["rank"], "alpha": float(settings["rank"]), "dropout": 0.0, "init": "kaiming",
            "preset": TRAIN_FIXED["preset"], "custom_pattern": "", "dtype": "float32"}},
        "4": {"class_type": "EliGenTrain", "inputs": {
            "model": _link(1, 0), "clip": _link(1, 1), "vae": _link(1, 2), "dataset": _link(2),
            "lora_config": _link(3), "lora_name": lora_name[: -len(".safetensors")],
            "steps": settings["steps"], "learning_rate": settings["learning_rate"],
            "batch_size": settings["batch_size"], "grad_accumulation": 1, "schedule": TRAIN_FIXED["schedule"],
            "warmup_steps": settings["warmup_steps"], "weight_decay": 0.01, "max_grad_norm": 1.0,
            "timestep_sampling": TRAIN_FIXED["timestep_sampling"], "entity_weight": 0.0, "precision": "fp32",
            "gradient_checkpointing": False, "entity_dropout": 0.0, "caption_dropout": 0.0, "seed": seed,
            "checkpoint_every": 0, "validation_every": 0, "validation_steps": 20, "resume": "",
            "write_reference_format": False, "cache": "memory", "entity_text_length": TEXT_LENGTH,
            "validation_guidance": 3.5, "max_vram_gb": 0.0, "blocks_to_swap": -1}},
        "5": {"class_type": "SaveImage", "inputs": {"images": _link(4, 2), "filename_prefix": f"{prefix}/c_loss"}},
    }


def all_workflows(count=16, layout_seed=0):
    """{template name: API graph} of the toy templates."""
    from . import painted  # it builds on this module

    graphs = {TEMPLATE_NAMES[c]: sampling_workflow(c, count, layout_seed) for c in ("a", "b", "d")}
    graphs[TEMPLATE_NAMES["c"]] = training_workflow()
    graphs[TEMPLATE_NAMES["e"]] = painted.painted_workflow(painted.example_layout())
    return graphs


def write_examples(folder=EXAMPLES_DIR, server_url=None):
    """Write every toy workflow as <folder>/api/<name>.json (API format, for `comfy run`) and, given a
    running ComfyUI with this package, its UI-format twin <folder>/<name>.json (scripts/make_ui_workflow.py)
    with the note <folder>/notes/<name>.md when there is one."""
    from . import painted  # it builds on this module

    paths = [painted.write_picture(folder)]
    for name, graph in sorted(all_workflows().items()):
        api_path = write_json(os.path.join(folder, "api", f"{name}.json"), graph)
        paths.append(api_path)
        if server_url:
            ui_path = os.path.join(folder, f"{name}.json")
            argv = [sys.executable, os.path.join(REPO, "scripts", "make_ui_workflow.py"), api_path, ui_path,
                    "--server", server_url]
            note = os.path.join(folder, "notes", f"{name}.md")
            if os.path.exists(note):
                argv += ["--note", note]
            subprocess.run(argv, check=True)
            paths.append(ui_path)
    return paths


def load_server_class():
    """scripts/comfy_server.py's ComfyServer (standard library only; the server runner the demo, this
    module and the tests share)."""
    path = os.path.join(REPO, "scripts", "comfy_server.py")
    spec = importlib.util.spec_from_file_location("eligen_comfy_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    """Rewrite the toy workflows: API graphs, and UI twins made against a temporary headless ComfyUI."""
    server_module = load_server_class()
    with server_module.ComfyServer() as server:
        server.check_nodes_loaded(server_module.expected_node_ids("comfyui_eligen"))
        for path in write_examples(server_url=server.url):
            print(f"wrote {os.path.relpath(path, REPO)}")
