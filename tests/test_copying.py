from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import pytest

from statekit._copying import copy_value, open_value, stored_form


@pytest.mark.parametrize(
    "value",
    [
        [1, "a", [2, {"k": (3, [4])}], {5, 6}],
        {"a": {"b": {"c": []}}},
        (1, 2, "x"),
        ((1,), [2]),
        [],
    ],
)
def test_fast_copy_matches_deepcopy(value: Any) -> None:
    copied = copy_value(value)
    assert copied == copy.deepcopy(value)
    assert type(copied) is type(value)


def test_fast_copy_shares_nothing_mutable() -> None:
    value: dict[str, Any] = {"a": [1, [2]], "t": ([3],)}
    copied = copy_value(value)
    copied["a"][1].append(9)
    copied["t"][0].append(9)
    assert value == {"a": [1, [2]], "t": ([3],)}


def test_tuple_of_atoms_is_not_copied_like_deepcopy() -> None:
    value = (1, "a")
    assert copy_value(value) is value is copy.deepcopy(value)


def test_sharing_and_cycles_are_preserved() -> None:
    shared = [1]
    copied = copy_value([shared, shared])
    assert copied[0] is copied[1]
    cycle: list[Any] = []
    cycle.append(cycle)
    again = copy_value(cycle)
    assert again[0] is again


def test_deep_trees_and_other_types_fall_back() -> None:
    deep: list[Any] = [0]
    for _ in range(300):
        deep = [deep]
    assert copy_value(deep) == deep

    class Thing:
        def __init__(self) -> None:
            self.x = [1]

    thing = Thing()
    assert copy_value(thing).x == [1]
    assert copy_value(thing) is not thing
    assert copy_value({(1, 2): 3, frozenset(): 4}) == {(1, 2): 3, frozenset(): 4}


def test_opening_a_large_image_leaves_gc_as_it_was() -> None:
    import gc

    from statekit._copying import open_value, stored_form

    stored = stored_form({f"k{i}": [i] for i in range(20_000)})
    assert gc.isenabled()
    assert len(open_value(stored)) == 20_000
    assert gc.isenabled()
    gc.disable()
    try:
        open_value(stored)
        assert not gc.isenabled()  # a host's choice is respected
    finally:
        gc.enable()


def test_classes_with_their_own_deepcopy_are_copied_with_it() -> None:
    from statekit._copying import Sealed, open_value, stored_form

    value = [BadReduce(3)]
    stored = stored_form(value)
    assert not isinstance(stored, Sealed)
    assert open_value(stored)[0].n == 3


def _fail(n: int) -> object:
    raise RuntimeError("cannot rebuild")


class BadReduce:
    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[Any, ...]:
        return (_fail, (self.n,))

    def __deepcopy__(self, memo: dict[int, Any]) -> BadReduce:
        return BadReduce(self.n)


@dataclasses.dataclass
class _Plain:
    id: int
    tags: list[str]


class _WithNew:
    made: ClassVar[list[str]] = []

    def __new__(cls) -> _WithNew:
        cls.made.append("new")
        return super().__new__(cls)


class _WithSetstate:
    def __init__(self) -> None:
        self.n = 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, restored=True)


class _Slotted:
    __slots__ = ("a",)

    def __init__(self) -> None:
        self.a = [1]


class _DictKind(dict):  # type: ignore[type-arg]
    pass


def _opened(value: Any) -> Any:
    return open_value(stored_form(value))


def test_plain_objects_take_the_fast_image_and_open_as_deepcopy_would() -> None:
    """A plain class's instances are imaged as object.__new__(cls) and their __dict__
    (no call into __reduce_ex__); the copy is deepcopy's: same class, equal fields,
    nothing shared, sharing and cycles inside kept. Fails if the fast path lost a field,
    shared a list with the original, or broke a cycle."""
    from statekit import _copying

    shared = ["x"]
    a, b = _Plain(1, shared), _Plain(2, shared)
    a.tags.append("y")
    loop = _Plain(3, [])
    loop.tags.append(loop)  # type: ignore[arg-type]
    value = [a, b, a, loop]
    copied = _opened(value)
    assert _copying._PLANS[_Plain] == _copying._DICT
    assert copied[:3] == copy.deepcopy(value[:3])  # (the cycle is compared below)
    assert [type(v) for v in copied] == [_Plain] * 4
    assert copied[0] is copied[2]  # sharing kept
    assert copied[0].tags is copied[1].tags  # the shared list, still shared
    assert copied[0].tags is not shared
    assert copied[3].tags[0] is copied[3]  # the cycle kept


@pytest.mark.parametrize("cls", [_WithNew, _WithSetstate, _Slotted, _DictKind])
def test_objects_with_their_own_protocol_keep_it(cls: type) -> None:
    """A class with its own __new__, __setstate__, __slots__, or a builtin base, is
    not plain: it keeps the __reduce_ex__ protocol, as deepcopy does (so __new__ and
    __setstate__ run when the copy is opened, and slots and items are kept)."""
    from statekit import _copying

    value: Any = cls()
    if isinstance(value, dict):
        value["k"] = [1]
        value.extra = "attribute"  # type: ignore[attr-defined]
    copied: Any = _opened([value])[0]
    assert _copying._PLANS[cls] == _copying._DEFAULT
    assert type(copied) is cls
    expected = copy.deepcopy(value)
    if cls is _WithSetstate:
        assert copied.__dict__ == expected.__dict__ == {"n": 1, "restored": True}
    elif cls is _Slotted:
        assert getattr(copied, "a") == [1]  # noqa: B009
        assert getattr(copied, "a") is not getattr(value, "a")  # noqa: B009
    elif cls is _DictKind:
        assert copied == expected == {"k": [1]}
        assert getattr(copied, "extra") == "attribute"  # noqa: B009
    else:
        assert _WithNew.made.count("new") >= 3  # made, deep-copied, and opened with it
