"""Settings declared once: a dataclass field made with `setting()` carries its flag's help, argparse group and
choices; `add_flags` turns a config dataclass into its command-line flags, `coerce` makes values read from a
file exactly the field's type. TensorFlow-free (flags and validation test in milliseconds)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from typing import Any


def setting(default: Any, help: str, group: str | None = None, *, choices: tuple[str, ...] | None = None,  # noqa: A002
            export: bool = False, flag: bool = True, type: Any = None, name: str | None = None,  # noqa: A002
            required: bool = False, fixed: bool = False) -> Any:
    """A config field and what is said of it: `help`, argparse `group` and `choices`, whether the exported model
    records it (`export`), whether it is a flag at all, the flag's argparse `type` when it is not the field's,
    its `name` when it is not the field's (`--print` for print_samples), whether it is `required`, and whether a
    resumed run must keep it (`fixed`: it shapes the model or the data and their order)."""
    meta = {"help": help, "group": group, "choices": choices, "export": export, "flag": flag, "type": type,
            "name": name, "required": required, "fixed": fixed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def base_type(hint: Any) -> Any:
    """`X | None` -> X; anything else as it is."""
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return hint


def add_flags(parser: argparse.ArgumentParser, cls: type, groups: tuple[str, ...] = ()) -> None:
    """One flag per field of `cls` (`--field-name`), typed as the field. Every flag defaults to None, meaning
    "not given", so that defaults, presets and config files fill the rest in one place (`given`)."""
    made = {name: parser.add_argument_group(name) for name in groups}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag", True):
            continue
        where = made[meta["group"]] if meta.get("group") else parser
        kind, kwargs = base_type(hints[f.name]), {"help": meta["help"], "default": None, "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        elif typing.get_origin(kind) is list:
            kwargs.update(nargs="+", type=int, metavar="N")
        else:
            kwargs.update(type=meta["type"] or kind, choices=meta["choices"])
        if meta.get("required"):
            kwargs["required"] = True
        where.add_argument("--" + (meta.get("name") or f.name).replace("_", "-"), **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of `cls` given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if v is not None and k in names}


def add_defaults_to_help(parser: argparse.ArgumentParser, defaults: dict[str, Any], label: str = "default") -> None:
    """Append `[label: value]` to each flag's help: the value it takes unless set. Helps that already explain
    their default (a run-time decision, e.g. "default: auto") keep their own words."""
    for action in parser._actions:
        value = defaults.get(action.dest)
        explained = action.help is None or "default" in action.help.lower()
        if not explained and not (value is None or value is False or value == ""):
            shown = ",".join(map(str, value)) if isinstance(value, list) else f"{value:g}" \
                if isinstance(value, float) else value
            action.help += f" [{label}: {shown}]"


def fixed_settings(cls: type) -> tuple[str, ...]:
    """The fields of `cls` declared `fixed`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("fixed"))


def check_choices(cfg: Any, error: type[Exception]) -> None:
    """A value from a config file (flags are checked by argparse) must be one of its setting's `choices`."""
    for f in dataclasses.fields(cfg):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and value is not None and value not in choices:
            raise error(f"unknown {f.name} {value!r}; choose one of: {', '.join(choices)}")


def coerce(cfg: Any, error: type[Exception]) -> None:
    """Config files may give numbers as strings or ints for floats; make types exact (from the annotations)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        kind = base_type(hints[f.name])
        try:
            if kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                setattr(cfg, f.name, int(float(value)))
            elif kind is float:
                setattr(cfg, f.name, float(value))
            elif kind is bool and not isinstance(value, bool):
                raise ValueError
            elif typing.get_origin(kind) is list:
                setattr(cfg, f.name, [int(u) for u in (value if isinstance(value, list) else [value])])
        except (TypeError, ValueError):
            raise error(f"setting {f.name} has an invalid value {value!r}") from None
