"""Change detection: snapshot a value, then tell whether it changed.

For each value, three ways of answering "did this value change during the event?":

- statekit: what an event pays for a stored value — open a private copy from the
  stored image, then judge it against the image (the image of the value the event ends
  with is also what gets stored, so nothing else is paid on a write);
- the peer: ``gradio.utils.deep_hash`` of the value before and after, as the peer does
  around every event (only when gradio is installed: ``pip install -e '.[bench]'``);
- naive: ``copy.deepcopy`` before, ``==`` after.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import attrs

from statekit._changes import judge
from statekit._copying import open_value, stored_form

from ._timing import Measure, best_per_op

TITLE = "change detection: snapshot + compare"
BASELINE = "statekit"


@dataclasses.dataclass
class Item:
    sku: int
    name: str
    qty: int


@attrs.define
class AttrsItem:
    sku: int
    name: str
    qty: int


class SlotsItem:
    __slots__ = ("name", "qty", "sku")

    def __init__(self, sku: int, name: str, qty: int) -> None:
        self.sku, self.name, self.qty = sku, name, qty

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SlotsItem) and (self.sku, self.name, self.qty) == (
            other.sku,
            other.name,
            other.qty,
        )

    __hash__ = None  # type: ignore[assignment]


def nested(depth: int) -> list[Any]:
    value: list[Any] = [0]
    for _ in range(depth):
        value = [value]
    return value


VALUES: dict[str, Callable[[], Any]] = {
    "100,000-int list": lambda: list(range(100_000)),
    "100,000-key dict of 2-item lists": lambda: {f"k{i}": [i, i + 1] for i in range(100_000)},
    "10,000 small dataclasses": lambda: [Item(i, f"item {i}", 1) for i in range(10_000)],
    "10,000 small attrs instances": lambda: [AttrsItem(i, f"item {i}", 1) for i in range(10_000)],
    "10,000 small __slots__ objects": lambda: [
        SlotsItem(i, f"item {i}", 1) for i in range(10_000)
    ],
    "1,000-deep nested list": lambda: nested(1_000),
}


def peer_deep_hash() -> Callable[[Any], str] | None:
    """The peer's ``deep_hash``, or None when gradio is not installed."""
    try:
        utils = importlib.import_module("gradio.utils")
    except ImportError:
        return None
    deep_hash: Callable[[Any], str] = utils.deep_hash
    return deep_hash


def contenders(value: Any) -> dict[str, Callable[[int], object]]:
    stored = stored_form(value)

    def statekit(ops: int) -> None:
        for _ in range(ops):
            judge(stored, open_value(stored))

    def naive(ops: int) -> None:
        for _ in range(ops):
            snapshot = copy.deepcopy(value)
            snapshot == value  # noqa: B015

    found: dict[str, Callable[[int], object]] = {"statekit": statekit}
    deep_hash = peer_deep_hash()
    if deep_hash is not None:

        def peer(ops: int) -> None:
            for _ in range(ops):
                deep_hash(value) == deep_hash(value)  # noqa: B015

        found["gradio deep_hash x2"] = peer
    found["deepcopy + =="] = naive
    return found


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    groups = [
        (label, best_per_op(contenders(make()), ops=1, rounds=2 if quick else 5))
        for label, make in VALUES.items()
    ]
    plot_objects(quick)
    return groups


def plot_objects(quick: bool) -> None:
    """Time per dataclass instance against how many the value holds, per contender:
    ``benchmarks/results/objects.png`` (with matplotlib, in the ``bench`` extra)."""
    from .scaling import plot

    counts = [100, 1_000, 10_000]
    series: dict[str, list[float]] = {}
    for n in counts:
        value = [Item(i, f"item {i}", 1) for i in range(n)]
        for m in best_per_op(contenders(value), ops=1, rounds=2 if quick else 5):
            if m.per_op is not None:
                series.setdefault(m.name, []).append(m.per_op / n)
    plot("objects (dataclass instances in a list)", counts, series, "µs per instance")
