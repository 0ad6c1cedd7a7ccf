"""Run files (training/run_file.py): export from an API graph, checks naming the bad field, round trip;
the headless trainer on one process (training/headless.py) and the model-file loaders in core/host/files.py."""

import json
import os

import pytest
import torch

from comfyui_eligen.core import host
from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.training import headless
from comfyui_eligen.training.dataset import dataset_from_images, load_dataset
from comfyui_eligen.training.lora import LoraSettings
from comfyui_eligen.training.loop import TrainSettings
from comfyui_eligen.training.run_file import RunFileError, build_run, export_run, load_run, validate_run, write_run

TOY = {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}}


def train_graph(**overrides):
    graph = {"1": TOY, "9": {"class_type": "EliGenTrain", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": ["2", 0], "lora_config": ["3", 0]}}}
    graph["9"]["inputs"].update(overrides)
    return graph


@pytest.fixture(scope="module")
def dataset_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_data")
    write_dataset(str(folder), 2, seed=0, split="train", size=32)
    return str(folder)


def exported(dataset_folder, graph=None, **kwargs):
    return build_run(graph or train_graph(), "9", load_dataset(dataset_folder, 4096), LoraSettings(rank=2, alpha=2.0),
                     TrainSettings(steps=3, seed=7), "my_lora", **kwargs)


def test_export_round_trip(tmp_path, dataset_folder):
    run = exported(dataset_folder, cache="disk", entity_text_length="real_length")
    assert run["version"] == 1
    assert run["model"] == run["clip"] == run["vae"] == {"loader": "EliGenToyModelLoader", "inputs": TOY["inputs"]}
    assert run["dataset"] == {"folder": os.path.realpath(dataset_folder), "max_pixels": 4096}
    assert run["train"]["seed"] == 7 and run["lora"]["rank"] == 2 and run["output"]["lora_name"] == "my_lora"
    path = write_run(str(tmp_path / "run.json"), run)
    assert load_run(path) == run
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic write left nothing behind


def test_export_from_file_loaders(dataset_folder):
    graph = train_graph(model=["4", 0], clip=["5", 0], vae=["6", 0])
    graph["4"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}}
    graph["5"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "t5xxl.safetensors", "type": "flux"}}
    graph["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    run = exported(dataset_folder, graph)
    assert run["model"] == {"loader": "UNETLoader", "inputs": graph["4"]["inputs"]}
    # an optional loader input left out of the graph is written with the loader's default
    assert run["clip"]["inputs"] == {**graph["5"]["inputs"], "device": "default"}
    assert run["vae"] == {"loader": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}


def test_what_cannot_be_exported_is_named(tmp_path, dataset_folder):
    graph = train_graph(model=["7", 0])
    graph["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0]}}
    with pytest.raises(RunFileError, match="model: comes from a LoraLoaderModelOnly node"):
        exported(dataset_folder, graph)
    with pytest.raises(RunFileError, match="clip: output 0 of EliGenToyModelLoader is not its clip"):
        exported(dataset_folder, train_graph(clip=["1", 0]))
    images = torch.rand(1, 32, 32, 3)
    with pytest.raises(RunFileError, match="dataset: it comes from graph images"):
        build_run(train_graph(), "9", dataset_from_images(images, None, "x", ""), LoraSettings(), TrainSettings(), "n")
    # the node's helper writes nothing then, and removes a stale file of an earlier run
    stale = tmp_path / "run.json"
    stale.write_text("{}")
    assert export_run(str(tmp_path), graph, "9", dataset=load_dataset(dataset_folder, 4096),
                      lora_settings=LoraSettings(), settings=TrainSettings(), lora_name="n") is None
    assert not stale.exists()


@pytest.mark.parametrize("change, field", [
    (lambda r: r.update(version=2), "'version'"),
    (lambda r: r["model"].update(loader="Nope"), "'model.loader'"),
    (lambda r: r["vae"]["inputs"].update(extra=1), "'vae.inputs' has unknown keys extra"),
    (lambda r: r["train"].update(steps=0), "'train': training settings: steps must be at least 1"),
    (lambda r: r["train"].update(stepz=3), "'train' has unknown keys stepz"),
    (lambda r: r["lora"].update(rank=0), "'lora'"),
    (lambda r: r["dataset"].update(folder=""), "'dataset.folder'"),
    (lambda r: r["encoding"].update(cache="cloud"), "'encoding.cache'"),
    (lambda r: r["output"].update(lora_name="../x"), "'output.lora_name'"),
])
def test_bad_fields_are_named(dataset_folder, change, field):
    run = json.loads(json.dumps(exported(dataset_folder)))
    change(run)
    with pytest.raises(RunFileError, match=field.replace("(", r"\(")):
        validate_run(run)


def test_unreadable_run_file_is_named(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("{not json")
    with pytest.raises(RunFileError, match="run.json: not valid JSON"):
        load_run(str(path))


def test_model_files_are_safetensors_only_and_found_in_a_models_dir(tmp_path):
    with pytest.raises(ValueError, match="only .safetensors"):
        host.files.model_file_path("vae", "ae.pt")
    with pytest.raises(ValueError, match="vae file 'missing.safetensors' not found"):
        host.files.model_file_path("vae", "missing.safetensors")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "mine.safetensors").write_bytes(b"")
    host.files.add_models_dir(str(tmp_path))
    assert host.files.model_file_path("vae", "mine.safetensors") == str(tmp_path / "vae" / "mine.safetensors")


@pytest.mark.parametrize("name", list(host.HEADLESS_CONTACTS))
def test_headless_contact_points_exist_in_this_comfyui(name):
    host.HEADLESS_CONTACTS[name]()


def test_headless_one_process_trains_and_resumes(tmp_path, dataset_folder):
    """Four steps in one go equal two steps, then two more resumed from the checkpoint."""
    run = exported(dataset_folder, entity_text_length="real_length")
    run["train"].update(steps=4, learning_rate=1e-2, checkpoint_every=2, batch_size=2)
    whole, path = headless.run(run, headless.Options(run_dir=str(tmp_path / "whole")))
    assert whole.step == 4 and os.path.exists(path) and os.path.exists(tmp_path / "whole" / "loss.png")
    headless.run(run, headless.Options(run_dir=str(tmp_path / "split"), steps=2))
    resumed, _ = headless.run(run, headless.Options(run_dir=str(tmp_path / "split"), resume="latest"))
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    for key, value in whole.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in whole.lora.items() if k.endswith("lora_up.weight"))
