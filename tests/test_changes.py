"""The change detector: exact for builtins, safe for any value, never recursing."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import pickle
import sys
from typing import Any

import attrs
import pytest

from statekit import Change, changed, compare


@dataclasses.dataclass
class Point:
    x: int
    y: list[int]


@attrs.define
class AttrsPoint:
    x: int
    tags: list[str] = attrs.Factory(list)


class Slotted:
    __slots__ = ("a", "b")

    def __init__(self, a: Any, b: Any = None) -> None:
        self.a = a
        self.b = b


class HashedById:
    """Defines its own hash over ``key`` only: the guide's rule applies."""

    def __init__(self, key: int, note: str) -> None:
        self.key = key
        self.note = note

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashedById) and other.key == self.key


class Opaque:
    """No fields, no hash of its own: compared by its pickle."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Opaque, ())


class Unpicklable:
    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("no pickling")


NAN = float("nan")


class TestExactBuiltins:
    @pytest.mark.parametrize(
        ("before", "after"),
        [
            ([1, 2], (1, 2)),
            (1, 1.0),
            (1, True),
            (0, False),
            ([1], [1.0]),
            ({"a": 1}, {"a": True}),
            ({1: "x"}, {1.0: "x"}),
            ({1, 2}, {1.0, 2}),
            (frozenset({1}), {1}),
            (0.0, -0.0),
            ("a", b"a"),
            (decimal.Decimal("1.0"), decimal.Decimal("1.00")),
            ([[1, [2, [3]]]], [[1, [2, [4]]]]),
            ({"k": [1, {"z": 2}]}, {"k": [1, {"z": 3}]}),
        ],
    )
    def test_these_differ(self, before: Any, after: Any) -> None:
        assert compare(before, after) is Change.CHANGED
        assert changed(after, before)

    @pytest.mark.parametrize(
        "value",
        [
            [1, "a", None, 2.5, b"x"],
            {"b": 1, "a": [1, 2, {3, 4}]},
            (1, (2, (3,))),
            NAN,
            [NAN],
            frozenset({1, "a", (2, 3)}),
            datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
            decimal.Decimal("NaN"),
        ],
    )
    def test_equal_distinct_copy_is_unchanged(self, value: Any) -> None:
        # deepcopy gives back some of these values themselves (a float, a tuple of
        # atoms, a Decimal); a pickle round trip never does.
        pickled = pickle.loads(pickle.dumps(value))
        assert pickled is not value  # else only the `before is after` shortcut runs
        # Fails if equal values that are distinct objects are reported changed.
        assert compare(value, pickled) is Change.SAME
        assert compare(pickled, copy.deepcopy(value)) is Change.SAME

    def test_dict_key_order_does_not_matter(self) -> None:
        assert compare({"a": 1, "b": 2}, {"b": 2, "a": 1}) is Change.SAME

    def test_aware_datetimes_in_other_zones_differ(self) -> None:
        utc = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone.utc)
        plus1 = utc.astimezone(datetime.timezone(datetime.timedelta(hours=1)))
        assert utc == plus1
        assert changed(utc, plus1)


class TestObjects:
    def test_in_place_mutation_of_dataclass_is_seen(self) -> None:
        before = Point(1, [1])
        after = copy.deepcopy(before)
        assert compare(before, after) is Change.SAME
        after.y.append(2)
        assert changed(before, after)

    def test_attrs_and_slots_fields_are_compared(self) -> None:
        assert changed(AttrsPoint(1), AttrsPoint(1, ["x"]))
        assert not changed(AttrsPoint(1, ["x"]), AttrsPoint(1, ["x"]))
        assert changed(Slotted(1), Slotted(2))
        assert not changed(Slotted([1]), Slotted([1]))
        unset = Slotted.__new__(Slotted)
        assert changed(unset, Slotted(1))

    def test_own_hash_decides_listeners_and_field_changes_are_quiet(self) -> None:
        before = HashedById(1, "a")
        assert compare(before, HashedById(2, "a")) is Change.CHANGED
        assert compare(before, HashedById(1, "a")) is Change.SAME
        # the guide's rule: same hash, no change event, but the write is kept
        assert compare(before, HashedById(1, "b")) is Change.QUIET
        assert compare([before, 1], [HashedById(1, "b"), 2]) is Change.CHANGED

    def test_opaque_objects_fall_back_to_pickle_and_never_raise(self) -> None:
        assert compare(Opaque(), Opaque()) is Change.SAME
        assert compare(Unpicklable(), Unpicklable()) is Change.CHANGED

    def test_functions_and_classes_compare_by_identity(self) -> None:
        assert not changed(len, len)
        assert changed(len, abs)
        assert changed(Point, AttrsPoint)


class TestSafety:
    def test_cycles_compare_without_recursion(self) -> None:
        a: list[Any] = [1]
        a.append(a)
        b: list[Any] = [1]
        b.append(b)
        assert compare(a, b) is Change.SAME
        c: list[Any] = [2]
        c.append(c)
        assert changed(a, c)

    def test_very_deep_nesting_compares_without_recursion(self) -> None:
        def nest(depth: int, leaf: int) -> list[Any]:
            value: list[Any] = [leaf]
            for _ in range(depth):
                value = [value]
            return value

        depth = sys.getrecursionlimit() * 20
        assert compare(nest(depth, 1), nest(depth, 1)) is Change.SAME
        assert changed(nest(depth, 1), nest(depth, 2))

    def test_shared_sub_objects(self) -> None:
        shared = [1, 2]
        before = [shared, shared]
        after = copy.deepcopy(before)
        assert compare(before, after) is Change.SAME
        after[0].append(3)
        assert changed(before, after)

    def test_raising_hash_counts_as_change(self) -> None:
        class Bad:
            def __hash__(self) -> int:
                raise RuntimeError("no")

        assert changed(Bad(), Bad())


class TestHashCollisions:
    def test_colliding_builtin_hashes_never_hide_a_change(self) -> None:
        assert hash(-1) == hash(-2)  # a real collision in CPython
        assert changed([-1], [-2])
        assert changed({-1: "x"}, {-2: "x"})
        assert changed({-1}, {-2})
        assert changed(frozenset({(-1, "a")}), frozenset({(-2, "a")}))

    def test_set_members_are_matched_by_equality_not_hash(self) -> None:
        class Same:
            def __init__(self, v: int) -> None:
                self.v = v

            def __hash__(self) -> int:
                return 0

            def __eq__(self, other: object) -> bool:
                return isinstance(other, Same) and other.v == self.v

        assert changed({Same(1)}, {Same(2)})
        assert not changed({Same(1)}, {Same(1)})


class TestSnapshots:
    def test_snapshot_preserves_sharing_and_cycles(self) -> None:
        from statekit._copying import open_value, stored_form

        shared = [1]
        cyclic: list[Any] = [shared, shared]
        cyclic.append(cyclic)
        opened = open_value(stored_form(cyclic))
        assert opened[0] is opened[1]
        assert opened[2] is opened
        assert compare(cyclic, opened) is Change.SAME

    def test_snapshot_is_no_larger_than_the_value(self) -> None:
        import tracemalloc

        from statekit._copying import Sealed, stored_form

        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            value = [f"item-{i}" for i in range(20_000)] + list(range(20_000))
            value_size = tracemalloc.get_traced_memory()[0] - base
            before = tracemalloc.get_traced_memory()[0]
            stored = stored_form(value)
            snapshot_size = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert isinstance(stored, Sealed)
        assert snapshot_size <= value_size

    @pytest.mark.parametrize(("mutate", "bound"), [(False, 1.6), (True, 2.5)])
    def test_an_event_holds_little_more_than_the_working_copy(
        self, mutate: bool, bound: float
    ) -> None:
        import tracemalloc

        from statekit import StateEngine

        engine = StateEngine()
        big = engine.session_state("big", list(range(100_000)))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[big]  # materialized and stored sealed
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            value = list(range(100_000, 200_000))
            value_size = tracemalloc.get_traced_memory()[0] - base
            del value
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            with engine.event(sid) as ev:
                if mutate:
                    ev[big][-1] = -1
                else:
                    ev[big]
            peak = tracemalloc.get_traced_memory()[1] - start
        finally:
            tracemalloc.stop()
        assert ev.result.changed == ({"big"} if mutate else set())
        # Unchanged: the working copy and its image. Changed: also the stored value,
        # opened for the exact walk.
        assert peak <= bound * value_size

    def test_values_100000_levels_deep_work_in_events(self) -> None:
        from statekit import StateEngine

        def nest(depth: int, leaf: int) -> list[Any]:
            value: list[Any] = [leaf]
            for _ in range(depth):
                value = [value]
            return value

        engine = StateEngine()
        deep = engine.session_state("deep", nest(100_000, 1))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            inner = ev[deep]
            while len(inner) == 1 and isinstance(inner[0], list):
                inner = inner[0]
            inner[0] = 2
        assert ev.result.changed == {"deep"}
        assert compare(deep.get(sid), nest(100_000, 2)) is Change.SAME


def test_an_item_added_or_a_class_changed_is_judged_without_opening_the_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The common event adds or removes an item: its verdict needs only the stored
    # value's class and length. Fails if judge() opens (unpickles) the stored image
    # for such a change, which an event on a large value pays for in full.
    from statekit._changes import judge
    from statekit._copying import Sealed, stored_form

    def refuse(self: Sealed) -> Any:
        raise AssertionError("the stored image was opened")

    for before, after in (
        (["milk"], ["milk", "eggs"]),
        ({"a": [1]}, {}),
        ({1, 2}, {1, 2, 3}),
        ([1, 2], (1, 2)),
        ([1, 2], Point(1, [2])),
    ):
        stored = stored_form(before)
        assert type(stored) is Sealed
        with monkeypatch.context() as patch:
            patch.setattr(Sealed, "open", refuse)
            assert judge(stored, after)[0] is Change.CHANGED
    # A change that keeps the length is still found by the exact walk.
    assert judge(stored_form(["milk"]), ["eggs"])[0] is Change.CHANGED
    assert judge(stored_form({"a": 1, "b": 2}), {"b": 2, "a": 1})[0] is Change.SAME


class _ReducesToDict:
    """Pickles as a plain dict (a ``__reduce__`` of its own)."""

    def __init__(self, data: dict[str, int]) -> None:
        self.data = data

    def __reduce__(self) -> Any:
        return (dict, (self.data,))


class _Key:
    def __init__(self, x: int) -> None:
        self.x = x

    def __hash__(self) -> int:
        return hash(self.x)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and other.x == self.x


def test_a_value_that_opens_as_another_class_or_length_is_judged_by_the_walk() -> None:
    # The class-and-length shortcut holds for images of builtin types alone. A user
    # class may open as another class (its own __reduce__) or length (a set whose
    # members' hash changed since they went in): an event that reads such a value and
    # leaves it as it opened changes nothing. Fails if the shortcut calls it changed
    # (listeners would fire, and the store be written, for a read-only event).
    from statekit._changes import judge
    from statekit._copying import open_value, stored_form

    one, two = _Key(1), _Key(2)
    members = {one, two}
    two.x = 1  # two equal members: the set opens with one
    for value in (_ReducesToDict({"b": 1, "a": 2}), members):
        stored = stored_form(value)
        assert judge(stored, open_value(stored))[0] is Change.SAME


def test_nan_members_and_keys_match_across_copies() -> None:
    from statekit._copying import open_value, stored_form

    for value in ({float("nan"), 1}, {float("nan"): 1, "a": 2}, {(float("nan"), 1)}):
        assert compare(value, open_value(stored_form(value))) is Change.SAME
    assert changed({float("nan"), 1}, {float("nan"), 2})
    assert changed({float("nan"): 1}, {float("nan"): 2})
