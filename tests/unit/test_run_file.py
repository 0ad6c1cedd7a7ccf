"""Run files (training/run_file.py, training/job.py): export from an API graph, the strict reader naming
the file and the field, round trip; the headless trainer on one process (training/headless.py) and the
model-file loaders in core/host/files.py."""

import json
import math
import os

import pytest
import torch

from comfyui_eligen.core import host
from comfyui_eligen.nodes.training import node_job
from comfyui_eligen.toyworld.data import write_dataset
from comfyui_eligen.toyworld.models import load_toy_models
from comfyui_eligen.training import headless
from comfyui_eligen.training.dataset import dataset_from_images, load_dataset
from comfyui_eligen.training.job import RunFileError, read_job
from comfyui_eligen.training.lora import LoraSettings
from comfyui_eligen.training.run_file import export_run, load_run, run_file_job, write_run
from comfyui_eligen.training.settings import TrainSettings

TOY = {"class_type": "EliGenToyModelLoader", "inputs": {"family": "flux", "weights": "random", "seed": 0}}
TOY_LOADERS = {"EliGenToyModelLoader": load_toy_models}  # what scripts/train.py passes in


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


def exported(dataset_folder, graph=None, cache="memory", entity_text_length="padded_512"):
    job = node_job(load_dataset(dataset_folder, 4096), LoraSettings(rank=2, alpha=2.0), TrainSettings(steps=3, seed=7),
                   "my_lora", cache=cache, entity_text_length=entity_text_length)
    return run_file_job(job, graph or train_graph(), "9")


def test_export_round_trip(tmp_path, dataset_folder):
    job = exported(dataset_folder, cache="disk", entity_text_length="real_length")
    assert job.model == job.clip == job.vae and job.model.loader == "EliGenToyModelLoader"
    assert job.model.inputs == TOY["inputs"]
    assert (job.dataset.folder, job.dataset.max_pixels) == (os.path.realpath(dataset_folder), 4096)
    assert job.train.seed == 7 and job.lora.rank == 2 and job.output.lora_name == "my_lora"
    path = write_run(str(tmp_path / "run.json"), job)
    with open(path) as handle:
        written = json.load(handle)
    assert list(written) == ["version", "kind", "model", "clip", "vae", "dataset", "lora", "train", "encoding", "output"]
    assert written["version"] == 1 and written["encoding"] == {"cache": "disk", "entity_text_length": "real_length"}
    assert load_run(path) == job
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic write left nothing behind


def test_export_from_file_loaders(dataset_folder):
    graph = train_graph(model=["4", 0], clip=["5", 0], vae=["6", 0])
    graph["4"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}}
    graph["5"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                             "clip_name2": "t5xxl.safetensors", "type": "flux"}}
    graph["6"] = {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}}
    job = exported(dataset_folder, graph)
    assert (job.model.loader, job.model.inputs) == ("UNETLoader", graph["4"]["inputs"])
    # an optional loader input left out of the graph is written with the loader's default
    assert job.clip.inputs == {**graph["5"]["inputs"], "device": "default"}
    assert (job.vae.loader, job.vae.inputs) == ("VAELoader", {"vae_name": "ae.safetensors"})


def test_what_cannot_be_exported_is_named(tmp_path, dataset_folder):
    graph = train_graph(model=["7", 0])
    graph["7"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0]}}
    with pytest.raises(RunFileError, match="model: comes from a LoraLoaderModelOnly node"):
        exported(dataset_folder, graph)
    with pytest.raises(RunFileError, match="clip: output 0 of EliGenToyModelLoader is not its clip"):
        exported(dataset_folder, train_graph(clip=["1", 0]))
    images = torch.rand(1, 32, 32, 3)
    from_graph = node_job(dataset_from_images(images, None, "x", ""), LoraSettings(), TrainSettings(), "n")
    with pytest.raises(RunFileError, match="dataset: it comes from graph images"):
        run_file_job(from_graph, train_graph(), "9")
    # the node's helper writes nothing then, and removes a stale file of an earlier run
    stale = tmp_path / "run.json"
    stale.write_text("{}")
    job = node_job(load_dataset(dataset_folder, 4096), LoraSettings(), TrainSettings(), "n")
    assert export_run(str(tmp_path), graph, "9", job) is None
    assert not stale.exists()


# Each bad value, the field its message names and what it says. JSON cannot hold 2**70 as a float but
# holds it as an integer; Infinity and NaN are what Python's json module reads from the bare words.
BAD_FIELDS = [
    (lambda r: r.update(version=2), "field 'version': is 2; this package reads version 1"),
    (lambda r: r["model"].update(loader="Nope"), "field 'model.loader': loader 'Nope' is not one of"),
    (lambda r: r["clip"].update(loader="UNETLoader", inputs={"unet_name": "x"}),
     "field 'clip.loader': UNETLoader does not give a clip"),
    (lambda r: r["vae"]["inputs"].update(extra=1), "field 'vae.inputs': inputs has unknown keys extra"),
    (lambda r: r["vae"]["inputs"].update(vae_name=None), "field 'vae.inputs.vae_name': must be a plain value"),
    (lambda r: r["train"].update(steps=0), "field 'train.steps': steps must be at least 1 (got 0)"),
    (lambda r: r["train"].update(steps="10"), "field 'train.steps': steps must be an integer (got \"10\")"),
    (lambda r: r["train"].update(steps=2.5), "field 'train.steps': steps must be an integer (got 2.5)"),
    (lambda r: r["train"].update(steps=math.inf), "field 'train.steps': steps must be an integer (got inf)"),
    (lambda r: r["train"].update(steps=True), "field 'train.steps': steps must be an integer (got true)"),
    (lambda r: r["train"].update(batch_size=2.0), "field 'train.batch_size': batch_size must be an integer (got 2.0)"),
    (lambda r: r["train"].update(seed=2**70), "field 'train.seed': seed must be at most 2147483647 (got 1180591620717411303424)"),
    (lambda r: r["train"].update(learning_rate=math.nan), "field 'train.learning_rate': learning_rate must be a positive number (got nan)"),
    (lambda r: r["train"].update(gradient_checkpointing=1), "field 'train.gradient_checkpointing': gradient_checkpointing must be true or false"),
    (lambda r: r["train"].update(stepz=3), "field 'train': unknown key stepz"),
    (lambda r: r["lora"].update(rank=0), "field 'lora.rank': rank must be at least 1"),
    (lambda r: r["lora"].update(rank=4.5), "field 'lora.rank': rank must be an integer (got 4.5)"),
    (lambda r: r["dataset"].update(folder=""), "field 'dataset.folder': folder must be a non-empty path"),
    (lambda r: r["dataset"].update(max_pixels=10), "field 'dataset.max_pixels': max_pixels must be at least 256"),
    (lambda r: r["encoding"].update(cache="cloud"), "field 'encoding.cache': cache 'cloud' is not one of memory, disk, off"),
    (lambda r: r["output"].update(lora_name="../../evil"), "field 'output.lora_name': lora_name '../../evil' must be a "
                                                           "plain file name (no folders: it contains a path separator)"),
    (lambda r: r["output"].update(lora_name="bad\0name"), "field 'output.lora_name': lora_name 'bad\\x00name' must be "
                                                          "a plain file name (it holds a NUL"),
    (lambda r: r.pop("vae"), "field 'vae': is missing"),
]


@pytest.mark.parametrize("change, message", BAD_FIELDS, ids=lambda x: x if isinstance(x, str) else "")
def test_the_reader_names_every_bad_field(dataset_folder, change, message):
    run = json.loads(json.dumps(exported(dataset_folder).to_run_file()))
    change(run)
    with pytest.raises(RunFileError) as error:
        read_job(run, "run file r.json")
    assert str(error.value).startswith("run file r.json: " + message), str(error.value)


def test_run_file_bytes_that_are_not_a_run_are_named(tmp_path, dataset_folder):
    good = json.dumps(exported(dataset_folder).to_run_file())
    cases = {
        "broken.json": (b"{not json", "not valid JSON (Expecting property name"),
        "latin1.json": (good.replace("my_lora", "caf\u00e9").encode("latin-1"), "not UTF-8 text (byte "),
        "infinite.json": (good.replace('"steps": 3', '"steps": Infinity').encode(),
                          "field 'train.steps': steps must be an integer (got inf)"),
        "twice.json": (good.replace('"steps": 3', '"steps": 3, "steps": 4').encode(), "key 'steps' appears twice"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RunFileError) as error:
            load_run(str(tmp_path / name))
        assert str(error.value).startswith(f"run file {tmp_path / name}: {message}"), str(error.value)
    with pytest.raises(RunFileError, match=r"missing.json: cannot be read \(No such file"):
        load_run(str(tmp_path / "missing.json"))


def test_a_loader_this_program_does_not_have_is_named(tmp_path, dataset_folder):
    job = exported(dataset_folder)
    with pytest.raises(RunFileError, match=r"field 'model.loader': EliGenToyModelLoader cannot be loaded by this "
                                           r"program \(it loads CheckpointLoaderSimple"):
        headless.run(job, headless.Options(run_dir=str(tmp_path / "run")))


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
    run = json.loads(json.dumps(exported(dataset_folder, entity_text_length="real_length").to_run_file()))
    run["train"].update(steps=4, learning_rate=1e-2, checkpoint_every=2, batch_size=2)
    job = read_job(run)
    whole = headless.run(job, headless.Options(run_dir=str(tmp_path / "whole")), loaders=TOY_LOADERS)
    assert whole.result.step == 4 and os.path.exists(whole.lora_path)
    assert os.path.exists(tmp_path / "whole" / "loss.png")
    headless.run(job, headless.Options(run_dir=str(tmp_path / "split"), steps=2), loaders=TOY_LOADERS)
    resumed = headless.run(job, headless.Options(run_dir=str(tmp_path / "split"), resume="latest"),
                           loaders=TOY_LOADERS).result
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    for key, value in whole.result.lora.items():
        torch.testing.assert_close(resumed.lora[key], value, rtol=0, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in whole.result.lora.items() if k.endswith("lora_up.weight"))


def test_every_bad_field_is_named_at_once(dataset_folder):
    run = json.loads(json.dumps(exported(dataset_folder).to_run_file()))
    run["train"].update(steps="10", seed=2**70)
    run["lora"].update(rank=4.5)
    run["output"].update(colour="red")
    with pytest.raises(RunFileError) as error:
        read_job(run, "run file r.json")
    assert str(error.value) == (
        "run file r.json: field 'lora.rank': rank must be an integer (got 4.5); "
        "field 'train.steps': steps must be an integer (got \"10\"); "
        "field 'output': unknown key colour (known in output: lora_name, write_reference_format)")
