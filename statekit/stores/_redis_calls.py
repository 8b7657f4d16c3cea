"""The calls a Redis operation makes, written once and run on either client.

An operation of the namespace is a :class:`Plan` — one script call and how to read its
reply — or, when it needs several calls (an open at capacity, a reap, a read that may
need a script, a global's add on a codec the script cannot add with), a generator of
calls (:data:`Ops`) that receives the answer of each: a script (a :class:`Plan`),
plain commands (:class:`Read`) or a pause between two tries (:class:`Pause`). The
namespace runs an operation blocking, or on the store's asyncio client: redis-py's two
clients have the same commands, so one :class:`Read` serves both.

The records are plain (not frozen) ``attrs`` records, never changed once made: one or
two are made for every operation, and a frozen one costs twice as much to make.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

__all__ = ["Call", "Ops", "Pause", "Plan", "Read", "raw"]

_T = TypeVar("_T")


@attrs.define
class Plan(Generic[_T]):
    """One script call of an operation, and how to read its reply."""

    script: str
    keys: list[Any]
    args: list[Any]
    answer: Callable[[Any], _T]


@attrs.define
class Read:
    """Plain commands (reads, no script): ``command(client)`` sends them on either
    client (on the asyncio one it returns an awaitable); ``damaged()`` is the error
    for an error reply, which means a key read holds another type of value.
    ``plain``: the same as one command's name and arguments, when it is one (the
    blocking store then sends it on a connection of its own, at less cost)."""

    command: Callable[[Any], Any]
    damaged: Callable[[], Exception]
    plain: tuple[Any, ...] | None = None


@attrs.define
class Pause:
    """A pause between two tries: ``time.sleep`` or ``asyncio.sleep``."""

    seconds: float


Call: TypeAlias = "Plan[Any] | Read | Pause"
Ops: TypeAlias = Generator[Call, Any, _T]
"""The calls of an operation that makes several, ending with its result."""


def raw(reply: Any) -> Any:
    """A reply as it is (for an operation that reads it itself)."""
    return reply
