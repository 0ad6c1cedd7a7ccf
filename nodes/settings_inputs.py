"""Node inputs made from a settings dataclass (``TrainSettings``, ``LoraSettings`` and the other parts of
a training job): each field's type, default and ``setting(...)`` metadata become one input with its
tooltip, so the dataclass is the only place for defaults, limits and help text."""

import dataclasses
import typing

from comfy_api.latest import io

_INPUTS = {int: io.Int.Input, float: io.Float.Input, bool: io.Boolean.Input, str: io.String.Input}


def node_fields(settings_cls, optional):
    """The fields shown on a node: required ones (``optional=False``) or optional ones, in field order."""
    return [f for f in dataclasses.fields(settings_cls)
            if f.metadata.get("node", True) and bool(f.metadata.get("optional", False)) == optional]


def setting_input(settings_cls, field):
    """One node input for a dataclass field (a field object or its name)."""
    if isinstance(field, str):
        field = next(f for f in dataclasses.fields(settings_cls) if f.name == field)
    kind = typing.get_type_hints(settings_cls)[field.name]
    meta = field.metadata
    tooltip = meta.get("help") or field.name.replace("_", " ")
    common = {"default": field.default, "tooltip": tooltip, "optional": bool(meta.get("optional", False))}
    if "choices" in meta:
        return io.Combo.Input(field.name, options=list(meta["choices"]), **common)
    if kind not in _INPUTS:
        raise TypeError(f"{settings_cls.__name__}.{field.name}: no node input for type {kind!r}")
    limits = {key: meta[key] for key in ("min", "max", "step") if key in meta and kind in (int, float)}
    return _INPUTS[kind](field.name, **limits, **common)


def setting_inputs(settings_cls, optional=False):
    return [setting_input(settings_cls, f) for f in node_fields(settings_cls, optional)]


def settings_from_inputs(settings_cls, values):
    """A settings object from a node's ``execute`` keyword arguments (fields the node leaves out, or an
    optional input left unconnected, keep their defaults)."""
    names = {f.name for f in dataclasses.fields(settings_cls)}
    return settings_cls(**{name: value for name, value in values.items() if name in names and value is not None})
