from __future__ import annotations

import copy
from typing import Any

import pytest

from statekit._copying import copy_value


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
