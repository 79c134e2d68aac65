"""A fast positional constructor for a slots dataclass: a C++ helper built on first use.

``constructor(cls)(*values)`` is ``cls(*values)``, every field given positionally in
``dataclasses.fields`` order, without running ``cls.__init__``: the instance is allocated and each
value stored in its slot (``fast_new.cpp``). The engine makes a ``RequestOutput`` for every decoding
sequence every step; the 15-field dataclass ``__init__`` costs ~0.25 us a call on the 2-core boxes, this
~0.1 us. Only classes whose ``__init__`` does nothing more qualify: ``@dataclass(slots=True)``, its
slots exactly its fields, no ``__post_init__``, no ``InitVar`` (checked, TypeError otherwise).

Building is kernels/cpu_build.py's, as for the CPU kernels; where it cannot build (no compiler, no
Python headers) or load, ``constructor`` returns ``cls`` itself, logged once: the same answer, slower.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from kernels import cpu_build

SOURCE = Path(__file__).with_name("fast_new.cpp")
T = TypeVar("T")


@functools.cache
def _module() -> ModuleType | None:
    lib = cpu_build.load_library(SOURCE, "the fast dataclass constructor", "the dataclass's own __init__")
    return None if lib is None else cpu_build.fast_calls(lib, SOURCE)


def fields_of(cls: type) -> tuple[str, ...]:
    """`cls`'s field names in argument order; TypeError unless its __init__ only stores them in slots."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    names = tuple(f.name for f in dataclasses.fields(cls))
    init = tuple(inspect.signature(cls.__init__).parameters)[1:]  # InitVars too; without fields not in it
    if getattr(cls, "__slots__", None) != names or init != names or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__}: a fast constructor needs @dataclass(slots=True), every field in "
                        "__init__ and no __post_init__")
    return names


def constructor(cls: type[T]) -> Callable[..., T]:
    """`cls`'s fast positional constructor (every field, in order); `cls` itself where the helper is
    unavailable. TypeError if `cls` does not qualify (see the module)."""
    names = fields_of(cls)
    module = _module()
    if module is None:
        return cls
    fast: Callable[..., Any] = module.constructor(cls, names)
    return fast
