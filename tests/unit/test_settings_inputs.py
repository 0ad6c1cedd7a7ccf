"""The settings dataclasses are the single source of the training nodes' inputs, defaults, limits and
tooltips: TrainSettings for the EliGen Train node, LoraSettings for the LoRA Config node, and the
encoding and output parts of a training job for the Train node's other options."""

import dataclasses

import pytest

from comfyui_eligen.nodes.settings_inputs import node_fields, settings_from_inputs
from comfyui_eligen.nodes.training import EliGenLoraConfig, EliGenTrain
from comfyui_eligen.training import job
from comfyui_eligen.training.lora import LoraSettings
from comfyui_eligen.training.settings import TrainSettings

JOB_PARTS = [TrainSettings, LoraSettings, job.TrainingJob, job.LoaderSpec, job.DatasetSpec, job.EncodingSettings,
             job.OutputSettings]


def schema_inputs(node):
    return {i.id: i for i in node.define_schema().inputs}


@pytest.mark.parametrize("field", [(cls, f) for cls in JOB_PARTS for f in dataclasses.fields(cls)],
                         ids=lambda p: f"{p[0].__name__}.{p[1].name}")
def test_every_field_has_help_text(field):
    cls, f = field
    assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help text"


def check_inputs(node, settings_cls, fields):
    inputs = schema_inputs(node)
    for field in fields:
        node_input = inputs[field.name]
        assert node_input.default == field.default, field.name
        assert node_input.tooltip == field.metadata["help"], field.name
        assert bool(node_input.optional) == bool(field.metadata.get("optional")), field.name
        for limit in ("min", "max", "step"):
            if limit in field.metadata:
                assert getattr(node_input, limit) == field.metadata[limit], (field.name, limit)
        if "choices" in field.metadata:
            assert list(node_input.options) == list(field.metadata["choices"]), field.name


def test_train_node_inputs_are_the_settings_fields_with_their_defaults_and_help():
    shown = node_fields(TrainSettings, optional=False) + node_fields(TrainSettings, optional=True)
    assert shown and len(shown) == len(dataclasses.fields(TrainSettings)) - 1  # keep_checkpoints stays off
    check_inputs(EliGenTrain, TrainSettings, shown)
    assert "keep_checkpoints" not in schema_inputs(EliGenTrain)
    check_inputs(EliGenTrain, job.EncodingSettings, dataclasses.fields(job.EncodingSettings))
    check_inputs(EliGenTrain, job.OutputSettings, dataclasses.fields(job.OutputSettings))


def test_lora_config_inputs_are_the_lora_settings_fields():
    fields = dataclasses.fields(LoraSettings)
    assert sorted(schema_inputs(EliGenLoraConfig)) == sorted(f.name for f in fields)
    check_inputs(EliGenLoraConfig, LoraSettings, fields)
    defaults = {name: i.default for name, i in schema_inputs(EliGenLoraConfig).items()}
    assert EliGenLoraConfig.execute(**defaults).result[0] == LoraSettings()


def test_node_defaults_give_the_dataclass_defaults():
    values = {name: node_input.default for name, node_input in schema_inputs(EliGenTrain).items()
              if name in {f.name for f in dataclasses.fields(TrainSettings)}}
    assert settings_from_inputs(TrainSettings, values) == TrainSettings()
    # an optional input left unconnected keeps its default
    assert settings_from_inputs(TrainSettings, {"steps": 7, "validation_guidance": None}) == TrainSettings(steps=7)
