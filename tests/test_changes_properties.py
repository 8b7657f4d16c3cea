"""Property tests of the change detector over random nested values."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statekit import Change, compare
from statekit._changes import judge
from statekit._copying import copy_value, open_value, stored_form


@dataclasses.dataclass
class Record:
    name: Any
    items: Any


class Plain:
    """Identity hashing, fields in __dict__."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a = a
        self.b = b

    def __repr__(self) -> str:
        return f"Plain({self.a!r}, {self.b!r})"


MARK = "\u22a5mutated"  # a string no generated value contains

atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
hashables = st.recursive(atoms, lambda inner: st.tuples(inner, inner), max_leaves=4)


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=5)
        | st.sets(hashables, max_size=5)
        | st.frozensets(hashables, max_size=5)
        | st.builds(Record, inner, inner)
        | st.builds(Plain, inner, inner)
    )


values = st.recursive(atoms, containers, max_leaves=25)


def mutable_parts(value: Any) -> list[Any]:
    """Every list, dict, set, Record and Plain reachable from ``value``."""
    found: list[Any] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, dict, set, Record, Plain)):
            found.append(item)
        if isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (Record, Plain)):
            stack.extend(vars(item).values())
    return found


def mutate(part: Any, choice: int) -> None:
    """Change ``part`` in place so that its value certainly differs."""
    if isinstance(part, list):
        if part and choice % 3 == 0:
            part[choice % len(part)] = MARK
        elif part and choice % 3 == 1:
            del part[choice % len(part)]
        else:
            part.append(MARK)
    elif isinstance(part, dict):
        if part and choice % 3 == 0:
            part[next(iter(part))] = MARK
        elif part and choice % 3 == 1:
            del part[next(iter(part))]
        else:
            part[MARK] = MARK
    elif isinstance(part, set):
        if part and choice % 2:
            part.pop()
        else:
            part.add(MARK)
    else:
        field = "name" if isinstance(part, Record) else "a"
        setattr(part, field, MARK)


def rebuilt(value: Any) -> Any:
    """An equal copy built afresh, without shared parts: dicts, sets and fields filled
    in reverse order."""
    if isinstance(value, list):
        return [rebuilt(item) for item in value]
    if isinstance(value, tuple):
        return tuple(rebuilt(item) for item in value)
    if isinstance(value, dict):
        return {key: rebuilt(item) for key, item in reversed(value.items())}
    if isinstance(value, (set, frozenset)):
        return type(value)(rebuilt(item) for item in reversed(list(value)))
    if isinstance(value, (Record, Plain)):
        copied = object.__new__(type(value))
        for field, item in reversed(vars(value).items()):
            setattr(copied, field, rebuilt(item))
        return copied
    return value


PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(values)
def test_value_against_equal_distinct_copies_is_unchanged(value: Any) -> None:
    # Unlike deepcopy, a pickle round trip also makes new floats, strings and bytes;
    # a rebuilt copy has another pickle, so the exact walk decides rather than the
    # bytes. Fails if the detector calls equal values changed because they are not
    # the same objects, or (rebuilt) because their dicts, sets or fields were filled
    # in another order.
    for copied in (pickle.loads(pickle.dumps(value)), rebuilt(value)):
        assert compare(value, copied) is Change.SAME
        assert compare(copied, value) is Change.SAME


@PROPS
@given(values)
def test_value_against_an_equal_deep_copy_is_unchanged(value: Any) -> None:
    assert compare(value, copy.deepcopy(value)) is Change.SAME
    assert compare(copy.deepcopy(value), value) is Change.SAME


@PROPS
@given(values)
def test_value_against_its_own_snapshot_is_unchanged(value: Any) -> None:
    stored = stored_form(value)
    assert judge(stored, open_value(stored))[0] is Change.SAME
    assert judge(stored, copy_value(value))[0] is Change.SAME


@PROPS
@given(values, st.data())
def test_any_single_mutation_anywhere_is_a_change(value: Any, data: st.DataObject) -> None:
    parts = mutable_parts(value)
    if not parts:
        value = [value]
        parts = [value]
    stored = stored_form(value)
    before = copy.deepcopy(value)
    part = data.draw(st.sampled_from(parts))
    mutate(part, data.draw(st.integers(0, 5)))
    assert compare(before, value) is Change.CHANGED
    assert judge(stored, value)[0] is Change.CHANGED


@PROPS
@given(values, values)
def test_judging_a_stored_value_agrees_with_the_exact_walk(before: Any, after: Any) -> None:
    # judge() tells some changes from the stored value's class and length alone,
    # without opening its image; it must still answer what compare() answers, for any
    # pair (values of other classes, containers of other lengths, equal ones rebuilt).
    # Fails if a shortcut calls a change what the exact walk calls the same, or the
    # other way round.
    stored = stored_form(before)
    for other in (after, rebuilt(before)):
        assert judge(stored, other)[0] is compare(before, other)


@PROPS
@given(values)
def test_copy_value_equals_deepcopy(value: Any) -> None:
    copied = copy_value(value)
    assert compare(copied, copy.deepcopy(value)) is Change.SAME
    assert compare(open_value(stored_form(value)), value) is Change.SAME
