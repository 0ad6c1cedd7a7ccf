"""Settings dataclasses described by their fields: type, default, help text and limits in one place.

``setting(default, help, min=, max=, step=, choices=, node=, optional=)`` declares a field; the node
inputs (nodes/settings_inputs.py), the checks of plain calls (``problems``) and the strict reader of
run files (``read_dataclass``) all read it, so a limit is written once.

``problems(obj, custom)`` gives {field: message}: each field's type (an int is not a bool or a float),
then finiteness, ``choices`` and ``min``/``max``, except for fields in ``custom``, whose own check
(value -> message or None) stands instead of those, for rules the limits cannot say.

``read_dataclass(cls, value)`` builds ``cls`` from parsed JSON and accepts nothing loosely: unknown
keys, a string or a float for an int, ``true`` for a number, ``Infinity``/``NaN``, values outside the
limits; every problem is reported at once, each with its field path (``field 'train.steps'``).
"""

import dataclasses
import json
import math
import types
import typing
from dataclasses import MISSING, field


def setting(default, help, **ui):
    """A settings field: its default, its help text (the node's tooltip) and its limits and how a node
    shows it (``min``, ``max``, ``step``, ``choices``; ``node=False`` keeps it off the node,
    ``optional=True`` makes it an optional input)."""
    return field(default=default, metadata={"help": help, **ui})


def part(cls, help):
    """A field holding a nested settings dataclass (default: ``cls()``)."""
    return field(default_factory=cls, metadata={"help": help})


class FieldError(ValueError):
    """Values that do not fit their fields: ``problems`` lists (dotted field path, message)."""

    def __init__(self, found):
        self.problems = list(found)
        super().__init__("; ".join(f"field '{path}': {message}" if path else message
                                   for path, message in self.problems))


def _shown(value):
    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _base_type(kind):
    """``int`` for ``int``, ``str`` for ``str | None``; None for other unions."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        others = [k for k in typing.get_args(kind) if k is not type(None)]
        return others[0] if len(others) == 1 else None
    return typing.get_origin(kind) or kind


def _optional(kind):
    return (isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union) \
        and type(None) in typing.get_args(kind)


def type_problem(value, kind):
    """What is wrong with the type of ``value`` for a field of type ``kind`` (None: nothing), as a
    phrase to put after the field's name."""
    if value is None:
        return None if _optional(kind) else "must be given (got null)"
    base = _base_type(kind)
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        return f"must be an integer (got {_shown(value)})"
    if base is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"must be a number (got {_shown(value)})"
    if base is bool and not isinstance(value, bool):
        return f"must be true or false (got {_shown(value)})"
    if base is str and not isinstance(value, str):
        return f"must be text (got {_shown(value)})"
    if base is dict and not isinstance(value, dict):
        return f"must be an object (got {_shown(value)})"
    return None


def range_problem(value, meta):
    """Finiteness, ``choices``, ``min`` and ``max`` of the field's metadata, as a phrase after the
    field's name."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return f"{value!r} is not one of {', '.join(map(str, choices))}"
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        return f"must not be negative (got {value})" if low == 0 else f"must be at least {low} (got {value})"
    if high is not None and value > high:
        return f"must be at most {high} (got {value})"
    return None


def problems(obj, custom=None):
    """{field name: message} for every field of the dataclass ``obj`` that is wrong, in field order."""
    custom = custom or {}
    kinds = typing.get_type_hints(type(obj))
    found = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = type_problem(value, kinds[f.name])
        if problem is None and (value is None or dataclasses.is_dataclass(value)):
            continue  # an optional part left out, or nested settings (they check themselves)
        if problem is not None:
            found[f.name] = f"{f.name} {problem}"
        elif f.name in custom:
            if (message := custom[f.name](value)) is not None:
                found[f.name] = message
        elif problem := range_problem(value, f.metadata):
            found[f.name] = f"{f.name} {problem}"
    return found


def raise_problems(what, found):
    """ValueError "<what>: a; b" listing every problem, or nothing when there is none."""
    if found:
        raise ValueError(f"{what}: " + "; ".join(found.values()))


# ---------------------------------------------------------------------------------------------------
# The strict reader


def read_dataclass(cls, value, path=""):
    """``cls`` from parsed JSON ``value``; FieldError naming every bad field by its dotted path.

    Keys missing from ``value`` take the field's default; a field without one must be present. Numbers
    are taken as written: an int field takes only an int, a float field an int or a float (stored as a
    float). Then ``cls.field_problems()`` (types and limits, see ``problems``) names what is left."""
    found = []
    obj = _read_dataclass(cls, value, path, found)
    if found:
        raise FieldError(found)
    return obj


def _read_dataclass(cls, value, path, found):
    """``cls`` from ``value``, or None after adding to ``found`` what is wrong with it."""
    if not isinstance(value, dict):
        found.append((path, f"must be an object (got {_shown(value)})"))
        return None
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        found.append((path, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                            f"(known in {path or 'the top level'}: {', '.join(known)})"))
    kinds = typing.get_type_hints(cls)
    values, before = {}, len(found)
    for name, f in known.items():
        inner = f"{path}.{name}" if path else name
        if name in value:
            values[name] = _read_value(kinds[name], value[name], inner, found)
        elif f.default is MISSING and f.default_factory is MISSING:
            found.append((inner, "is missing"))
    if len(found) > before:
        return None
    obj = cls(**values)
    checked = obj.field_problems() if hasattr(obj, "field_problems") else problems(obj)
    found += [(f"{path}.{name}" if path else name, message) for name, message in checked.items()]
    return obj


def _read_value(kind, value, path, found):
    base = _base_type(kind)
    if value is None and _optional(kind):
        return None
    if dataclasses.is_dataclass(base):
        return _read_dataclass(base, value, path, found)
    problem = type_problem(value, kind)
    if problem:
        found.append((path, f"{path.rsplit('.', 1)[-1]} {problem}"))
        return None
    if base is float:
        return float(value)
    if base is dict:
        plain = {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                found.append((f"{path}.{key}", f"must be a finite number (got {item})"))
            elif not isinstance(item, (str, int, float, bool)):
                found.append((f"{path}.{key}", f"must be a plain value (text, number, true or false), "
                                               f"got {_shown(item)}"))
            plain[key] = item
        return plain
    return value
