"""A run's settings in a file: ``fdino train --config run.toml`` (or any run's ``run.json``).

    preset = "small32_resnet"          # optional: the base DinoConfig (default: the CLI's)

    [config]                           # DinoConfig fields, applied on top of the preset
    out_dim = 4096
    global_crop_scale = [0.3, 1.0]
    backbone_kwargs = { depth = 6, embed_dim = 192 }

    [options]                          # TrainOptions fields
    data = "shapes10"
    max_steps = 500

A ``run.json`` holds the same two tables as JSON objects (``"config"``, ``"options"``; no preset:
its config is complete), so every run can be started again from its folder; its record of the run
(`RUN_RECORD_KEYS`) is skipped. Unknown keys and
values of the wrong type are errors that name the file, the table and the allowed keys.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from .checks import is_int, is_number
from .config import DinoConfig
from .train import TrainOptions

TABLES = {"config": DinoConfig, "options": TrainOptions}
# What a run.json records of its run, not settings: resume changes, the budget's fit, what precision 'auto'
# chose. A run started from that file fits and chooses again.
RUN_RECORD_KEYS = ("changes", "budget", "precision")
# Fields holding (name, value) pairs: a TOML/JSON table {name = value} is read as those pairs.
_PAIR_FIELDS = ("backbone_kwargs", "augment")


def field_type(cls: type, f: dataclasses.Field) -> Any:
    """The Python type of dataclass field ``f`` of ``cls`` without its ``None`` option (``X | None`` -> X)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


def config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (.toml) or JSON (.json, e.g. a run's run.json) file: preset, [config], [options].

    Returns ``{"preset": str | None, "config": {field: value}, "options": {field: value}}`` with
    values checked against the fields' types (DinoConfig / TrainOptions validate ranges later).
    """
    path = Path(path)
    data = read_settings(path)
    unknown = sorted(set(data) - {"preset", *TABLES, *RUN_RECORD_KEYS})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} at the top level; allowed: ['preset', 'config', 'options']")
    preset = data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ValueError(f"{path}: preset = {preset!r} must be a preset name (a string)")
    out: dict[str, Any] = {"preset": preset}
    for table, cls in TABLES.items():
        values = data.get(table, {})
        if not isinstance(values, dict):
            raise ValueError(f"{path}: [{table}] must be a table of {cls.__name__} fields, not {type(values).__name__}")
        out[table] = checked_fields(path, table, cls, values)
    return out


def checked_fields(path: Path, table: str, cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (field -> value, from table ``[table]`` of ``path``) as dataclass ``cls`` takes them;
    an unknown field or a value of the wrong type is an error naming the file, the table and the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown} in [{table}]; allowed ({cls.__name__} fields): {sorted(fields)}"
        )
    return {name: _checked(path, table, cls, fields[name], value) for name, value in values.items()}


def read_settings(path: Path) -> dict[str, Any]:
    """The top-level table of a .toml or .json settings file (clear errors for anything else)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    elif path.suffix == ".toml":
        try:
            import tomllib  # noqa: PLC0415  (3.11+; 3.10 gets the message below)
        except ModuleNotFoundError:  # Python 3.10: no TOML reader in the standard library
            raise ValueError(
                f"{path}: reading TOML needs Python >= 3.11 (tomllib); on 3.10 write the same "
                "tables as JSON (the run.json format)"
            ) from None
        with open(path, "rb") as f:
            data = tomllib.load(f)
    else:
        raise ValueError(f"{path}: a config file must end in .toml or .json (a run's run.json works too)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table/object at the top, got {type(data).__name__}")
    return data


def _checked(path: Path, table: str, cls: type, f: dataclasses.Field, value: Any) -> Any:
    """``value`` of field ``f`` as the dataclass takes it; a wrong type is an error naming the key."""
    if f.name in _PAIR_FIELDS and isinstance(value, dict):
        return tuple(value.items())
    kind = field_type(cls, f)
    optional = typing.get_type_hints(cls)[f.name] is not kind
    if value is None and optional:
        return None
    ok = {bool: lambda v: isinstance(v, bool), int: is_int, float: is_number, str: lambda v: isinstance(v, str)}.get(
        kind, lambda v: isinstance(v, (list, tuple))
    )
    if not ok(value):
        raise ValueError(
            f"{path}: [{table}] {f.name} = {value!r} is not a {getattr(kind, '__name__', kind)}"
            + (" (or null)" if optional else "")
        )
    return value
