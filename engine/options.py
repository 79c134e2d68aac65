"""Config fields that carry their own default, range, help text and command-line flag.

Every option a person can set is declared once, on the frozen dataclass that uses it:

    @dataclass(frozen=True)
    class EngineConfig:
        block_size: int = option(16, "tokens per KV block", min=1)

        def __post_init__(self) -> None:
            check_options(self)                  # types, ranges and choices -> ValueError

    add_options(parser, EngineConfig)            # --block-size N, with help, default and type
    cfg = from_args(EngineConfig, args)          # the dataclass built from the parsed flags

A field whose type is itself such a dataclass is flattened into the same parser (a worker's config
holds an EngineConfig). Torch-free: the gateway and `tandem health` build their parsers from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, dataclass
from typing import Any

_KEY = "tandem.option"
REQUIRED: Any = MISSING  # option(REQUIRED, ...) for a field with no default


@dataclass(frozen=True)
class Spec:
    """What `option` records about a field (in its dataclass metadata)."""

    help: str
    flag: str | None = None  # default: --the-field-name
    choices: tuple[Any, ...] | None = None
    min: float | None = None  # inclusive bounds; None: unbounded
    max: float | None = None
    above: float | None = None  # exclusive lower bound
    cli: bool = True  # False: set in code only (a test knob, a value other flags derive)
    metavar: str | None = None


def option(default: Any, help: str, *, flag: str | None = None, choices: Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, above: float | None = None,
           cli: bool = True, metavar: str | None = None, factory: Any = None) -> Any:
    """A dataclass field with its help text, range and flag. `factory` builds mutable/nested defaults."""
    spec = Spec(help, flag, tuple(choices) if choices is not None else None, min, max, above, cli, metavar)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: spec})
    return dataclasses.field(default=default, metadata={_KEY: spec})


def spec_of(f: dataclasses.Field[Any]) -> Spec | None:
    return f.metadata.get(_KEY)


@dataclass(frozen=True)
class _Field:
    name: str
    spec: Spec
    base: type  # int, float, str, bool, tuple (of str) or a nested options dataclass
    optional: bool  # None is allowed
    field: dataclasses.Field[Any]

    @property
    def flag(self) -> str:
        return "--" + (self.spec.flag or self.name.replace("_", "-"))

    @property
    def required(self) -> bool:
        return self.field.default is MISSING and self.field.default_factory is MISSING

    @property
    def default(self) -> Any:
        if self.field.default is not MISSING:
            return self.field.default
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return None


def _fields(cls: type) -> Iterator[_Field]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            (hint,) = [a for a in args if a is not type(None)]
        base = typing.get_origin(hint) or hint
        if spec is None and dataclasses.is_dataclass(base):
            spec = Spec(help="")  # a nested options dataclass: flattened
        if spec is not None:
            yield _Field(f.name, spec, base, optional, f)


def _is_nested(f: _Field) -> bool:
    return dataclasses.is_dataclass(f.base)


def check_options(obj: Any) -> None:
    """Check every option field's type, range and choices; ValueError names the flag and the value."""
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        if _is_nested(f) or (value is None and f.optional):
            continue
        name = f.name
        if value is None:
            raise ValueError(f"{name} must be set")
        if f.base is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
            continue
        if f.base is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if f.base is float:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if f.base is str and not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        s = f.spec
        if s.choices is not None and value not in s.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, s.choices))}, got {value!r}")
        low_ok = (s.min is None or value >= s.min) and (s.above is None or value > s.above)
        if not low_ok or (s.max is not None and value > s.max):
            raise ValueError(f"{name} must be {_range_text(s)}, got {value!r}")


def _range_text(s: Spec) -> str:
    """"in [1, 16]", ">= 0", "> 0", "in (0, 1]"."""
    if s.max is not None and (s.min is not None or s.above is not None):
        low = f"[{s.min:g}" if s.min is not None else f"({s.above:g}"
        return f"in {low}, {s.max:g}]"
    if s.min is not None:
        return f">= {s.min:g}"
    if s.above is not None:
        return f"> {s.above:g}"
    return f"<= {s.max:g}" if s.max is not None else ""


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                exclude: Sequence[str] = (), defaults: dict[str, Any] | None = None,
                helps: dict[str, str] | None = None, passthrough: bool = False) -> None:
    """Add a flag for every option field of `cls` (nested option dataclasses flattened), skipping
    flags the parser already has (several configs share one, such as --kv-timeout).

    `defaults` and `helps` override a field's default or help text for this parser (a component's
    own port). With `passthrough`, unset flags stay out of the parsed namespace (argparse.SUPPRESS):
    `forward_args` then re-emits only what the user gave (`tandem up` -> its children).
    """
    defaults = defaults or {}
    helps = helps or {}
    for f in _fields(cls):
        if f.name in exclude or not f.spec.cli:
            continue
        if _is_nested(f):
            add_options(parser, f.base, exclude=exclude, defaults=defaults, helps=helps, passthrough=passthrough)
            continue
        if f.flag in parser._option_string_actions:
            continue
        s = f.spec
        default = defaults.get(f.name, f.default)
        kw: dict[str, Any] = {"dest": f.name}
        shown = "" if default is None or default == () else f" (default: {_show(default)})"
        bounds = _range_text(s)
        kw["help"] = helps.get(f.name, s.help) + (f"; {bounds}" if bounds else "") + shown
        if f.base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _csv if f.base is tuple else f.base
            if s.choices is not None:
                kw["choices"] = list(s.choices)
            else:
                kw["metavar"] = s.metavar or f.flag[2:].upper().replace("-", "_")
        if f.required and f.name not in defaults:
            kw["required"] = True
        elif passthrough:
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = default
        parser.add_argument(f.flag, **kw)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """`cls` built from parsed flags (nested option dataclasses too); `overrides` win.
    Raises ValueError as the dataclass's own checks do."""
    values: dict[str, Any] = {}
    for f in _fields(cls):
        if f.name in overrides:
            continue
        if _is_nested(f):
            values[f.name] = from_args(f.base, args)
        elif hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values, **overrides)


def forward_args(cls: type, args: argparse.Namespace, *, exclude: Sequence[str] = ()) -> list[str]:
    """The flags of `cls` present in `args` (parsed with passthrough), as argv for a child process."""
    argv: list[str] = []
    for f in _fields(cls):
        if f.name in exclude or not f.spec.cli:
            continue
        if _is_nested(f):
            argv += forward_args(f.base, args, exclude=exclude)
            continue
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.base is bool:
            argv.append(f.flag if value else "--no-" + f.flag[2:])
        elif value is not None:
            argv += [f.flag, _show(value)]
    return argv


def option_names(cls: type) -> list[str]:
    """Every option field name of `cls`, nested ones flattened (for tests and docs)."""
    names: list[str] = []
    for f in _fields(cls):
        names += option_names(f.base) if _is_nested(f) else [f.name]
    return names


__all__ = ["REQUIRED", "Spec", "add_options", "check_options", "forward_args", "from_args", "option",
           "option_names", "spec_of"]
