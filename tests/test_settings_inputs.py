"""TrainSettings is the single source of the EliGen Train node's training inputs, defaults and tooltips."""

import dataclasses

import pytest

from comfyui_eligen.nodes.settings_inputs import node_fields, settings_from_inputs
from comfyui_eligen.nodes.training import EliGenTrain
from comfyui_eligen.training.loop import TrainSettings


def schema_inputs():
    return {i.id: i for i in EliGenTrain.define_schema().inputs}


@pytest.mark.parametrize("field", dataclasses.fields(TrainSettings), ids=lambda f: f.name)
def test_every_setting_has_help_text(field):
    assert len(field.metadata.get("help", "")) > 10, f"TrainSettings.{field.name} has no help text"


def test_node_inputs_are_the_settings_fields_with_their_defaults_and_help():
    inputs = schema_inputs()
    shown = node_fields(TrainSettings, optional=False) + node_fields(TrainSettings, optional=True)
    assert shown and len(shown) == len(dataclasses.fields(TrainSettings)) - 1  # keep_checkpoints stays off
    for field in shown:
        node_input = inputs[field.name]
        assert node_input.default == field.default, field.name
        assert node_input.tooltip == field.metadata["help"], field.name
        assert bool(node_input.optional) == bool(field.metadata.get("optional")), field.name
        if "min" in field.metadata:
            assert node_input.min == field.metadata["min"], field.name
        if "choices" in field.metadata:
            assert list(node_input.options) == list(field.metadata["choices"]), field.name
    assert "keep_checkpoints" not in inputs


def test_node_defaults_give_the_dataclass_defaults():
    values = {name: node_input.default for name, node_input in schema_inputs().items()
              if name in {f.name for f in dataclasses.fields(TrainSettings)}}
    assert settings_from_inputs(TrainSettings, values) == TrainSettings()
    # an optional input left unconnected keeps its default
    assert settings_from_inputs(TrainSettings, {"steps": 7, "validation_guidance": None}) == TrainSettings(steps=7)
