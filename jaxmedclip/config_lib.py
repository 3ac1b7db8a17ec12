"""Experiment configs: loading `path.py[:arg]`, typed options, and field overrides.

An experiment is a Python file with `get_config(arg=None) -> ConfigDict`. The text after
`:` in `--config path.py:key=value,...` reaches `get_config` as a string; configs turn it
into typed options with `parse_arg`, so that an unknown key is an error naming the valid
ones.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Iterable, MutableMapping
from typing import Any

import ml_collections


def add_cpu_devices(count: int, env: MutableMapping[str, str] = os.environ) -> None:
    """Asks XLA (through `env`'s XLA_FLAGS) for `count` fake CPU devices; effective for a
    process whose jax is not yet imported (this one, before the import, or a child)."""
    flag = f"--xla_force_host_platform_device_count={count}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()


def _parse_value(text: str, default: Any) -> Any:
    """Converts `text` to the type of `default` (bool, int, float, str, tuple, list);
    "None" is None whatever the type (the schema refuses it where a value is needed)."""
    if text.strip() == "None":
        return None
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "y", "t"):
            return True
        if lowered in ("0", "false", "no", "n", "f"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if default is None or isinstance(default, (list, tuple)):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if default is None:
                return text
            raise ValueError(f"expected a Python literal like {default!r}, got {text!r}") from None
    return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `key=value,key2=value2` into a ConfigDict typed like `defaults`.

    A bare `key` sets a boolean option to True (`runlocal` style). Unknown keys raise a
    ValueError that lists the valid ones.
    """
    options = dict(defaults)
    if arg:
        for item in arg.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip()
            if key not in defaults:
                valid = ", ".join(sorted(defaults)) or "(none)"
                raise ValueError(f"unknown config option {key!r}; valid options: {valid}")
            if not sep:
                if not isinstance(defaults[key], bool):
                    raise ValueError(f"config option {key!r} needs a value: {key}=<value>")
                options[key] = True
                continue
            try:
                options[key] = _parse_value(value.strip(), defaults[key])
            except ValueError as e:
                raise ValueError(f"config option {key}={value!r}: {e}") from None
    return ml_collections.ConfigDict(options)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/experiment.py[:arg]` and returns `get_config(arg)`, checked and
    with every declared field filled in (`config_schema.complete`)."""
    from jaxmedclip import config_schema

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    name = "jaxmedclip_experiment_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path!r} defines no get_config(arg=None)")
    return config_schema.complete(module.get_config(arg or None), required=False)


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Applies `field.path=value` overrides; values are parsed like Python literals.

    The type of the existing field is kept (an int field stays int). Unknown fields raise a
    KeyError that names the valid fields at that level.
    """
    config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
    for override in overrides:
        field, sep, text = override.partition("=")
        field = field.strip()
        if not sep:
            raise ValueError(f"override {override!r} is not of the form field.path=value")
        *parents, leaf = field.split(".")
        node = config
        for i, part in enumerate(parents + [leaf]):
            if part not in node:
                here = ".".join(parents[:i]) or "<top level>"
                valid = ", ".join(sorted(node.keys()))
                raise KeyError(f"unknown config field {field!r}: {here} has fields {valid}")
            if i < len(parents):
                node = node[part]
                if node is None:
                    group = ".".join(parents[: i + 1])
                    raise ValueError(f"config field {field!r}: the group {group} is off "
                                     f"(None); switch it on in the experiment file")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError(f"config field {field!r} is a group; override one of its fields")
        try:
            value = _parse_value(text, current)
        except ValueError as e:
            raise ValueError(f"override {field}={text!r}: {e}") from None
        node[leaf] = value
    return config


def override_flags(parser, rest: Iterable[str]) -> list[str]:
    """`--config.a.b=value` items left over by `parser.parse_known_args` -> ["a.b=value"];
    anything else is reported through `parser.error` (exits with usage)."""
    bad = [item for item in rest if not item.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --config.field=value")
    return [item[len("--config.") :] for item in rest]


def config_from_flags(spec: str, overrides: Iterable[str] = (), *, required: bool = True
                      ) -> ml_collections.ConfigDict:
    """`--config path.py:arg` plus `--config.field=value` overrides (any declared field),
    checked against the declared fields (`config_schema`). `required=False`: fields
    without a default may be absent (the data tools read only `data`)."""
    from jaxmedclip import config_schema

    return config_schema.complete(apply_overrides(load_config(spec), overrides),
                                  required=required)
