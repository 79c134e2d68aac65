"""The fast positional constructor of a slots dataclass (kernels/fast_new): it makes what the class
itself makes from the same positional values, holds its references like one, refuses classes whose
__init__ does more than store fields, and the engine's text maker uses it for plain decode outputs."""

from __future__ import annotations

import dataclasses
import gc
import sys
import sysconfig
from pathlib import Path

import pytest

from engine.outputs import NONE, FinishReason, RequestOutput
from engine.text_thread import TextMaker
from kernels import cpu_build, fast_new

HEADERS = (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()
fast_only = pytest.mark.skipif(cpu_build.compiler() is None or not HEADERS,
                               reason="no C++ compiler or Python headers: the class itself is the constructor")


def values() -> tuple[object, ...]:
    return ("req-1", [5, 6], "text", True, FinishReason.STOP, 16, 7, 4, NONE, None, None, 2, None, NONE, "</s>")


@fast_only
def test_it_makes_what_the_class_makes() -> None:
    new = fast_new.constructor(RequestOutput)
    assert new is not RequestOutput and type(new).__name__ == "builtin_function_or_method"
    made = new(*values())
    assert type(made) is RequestOutput
    assert made == RequestOutput(*values())
    assert dataclasses.astuple(made) == dataclasses.astuple(RequestOutput(*values()))
    made.new_text += "!"  # an ordinary instance: writable, replaceable, collectable
    assert dataclasses.replace(made, index=0).new_text == "text!"
    assert gc.is_tracked(made)


@fast_only
def test_it_holds_and_drops_its_references() -> None:
    new = fast_new.constructor(RequestOutput)
    token_ids, text = [1, 2, 3], "".join(["a", "b"])  # objects whose counts only this test moves
    before = sys.getrefcount(token_ids), sys.getrefcount(text)
    outs = [new("r", token_ids, text, False, None, 1, 1, 0, NONE, None, None, 0, None, NONE, None) for _ in range(100)]
    assert (sys.getrefcount(token_ids), sys.getrefcount(text)) == (before[0] + 100, before[1] + 100)
    del outs
    assert (sys.getrefcount(token_ids), sys.getrefcount(text)) == before
    cycle = new("r", [], "", False, None, 1, 1, 0, NONE, None, None, 0, None, NONE, None)
    cycle.seq = cycle  # type: ignore[assignment]  # a reference cycle through a slot: the GC frees it
    gc.collect()
    del cycle
    assert gc.collect() >= 1


@fast_only
def test_a_wrong_number_of_values_raises_type_error() -> None:
    new = fast_new.constructor(RequestOutput)
    with pytest.raises(TypeError, match="takes 15 positional arguments, got 2"):
        new("r", [1])


def test_classes_whose_init_does_more_are_refused() -> None:
    @dataclasses.dataclass
    class WithDict:
        a: int

    @dataclasses.dataclass(slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            self.a += 1

    @dataclasses.dataclass(slots=True)
    class NotInInit:
        a: int
        b: int = dataclasses.field(default=0, init=False)

    @dataclasses.dataclass(slots=True)
    class WithInitVar:
        a: int
        scale: dataclasses.InitVar[int] = 1

    for cls in (WithDict, PostInit, NotInInit, WithInitVar, int):
        with pytest.raises(TypeError):
            fast_new.constructor(cls)


@fast_only
def test_the_text_maker_makes_plain_outputs_with_it() -> None:
    maker = TextMaker(lambda req, out: None)
    assert maker._new_output is not RequestOutput
