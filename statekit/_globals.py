"""Global values: read, replaced atomically, added to, and their change listeners.

A global's writes are immediate (not part of an event's commit): an update is a
compare-and-set loop on the store, so that no update is lost to another thread or
process; an increment is one atomic add. Each operation is written once, as steps
(``_steps.py``), for the blocking methods and their async twins. Listeners run after
the write, in the thread that drives the steps (the writer's, or the event loop's),
outside every lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ._changes import CHANGED, SAME, compare
from ._checks import qualname
from ._copying import copy_value
from ._core import Core
from ._states import GlobalState
from ._steps import GlobalAdd, GlobalCas, GlobalGet, Steps, ask
from ._values import CheckedObjectValues, not_storable, unreadable
from ._watch import Watchers
from .exceptions import CodecError

__all__ = ["Globals"]

logger = logging.getLogger("statekit")

T = TypeVar("T")


class Globals:
    """The global values of one engine. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self._core = core
        #: The engine's open watches (set by the engine), told of each change.
        self.watchers: Watchers | None = None

    def get(self, state: GlobalState[T]) -> Steps[T]:
        core = self._core
        core.check_usable()
        found = yield from ask(GlobalGet(state.name))
        if found is None:
            value: T = state.default
            return value
        result: T = core.open_value(state, found[0])
        return result

    def update(self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any) -> Steps[T]:
        """Replace a global's value with ``fn(current)``, or with ``new`` when ``fn`` is
        None (a ``set()``, which never reads the current value: it works even when that
        no longer opens)."""
        core = self._core
        core.check_usable()
        values, name = core.values, state.name
        while True:
            found = yield from ask(GlobalGet(name))
            if found is None:
                version = None
                if fn is not None:
                    new = fn(state.default)
                verdict = compare(state.default, new)
                stored = values.store(name, new)
            else:
                old, version = found
                if fn is not None:
                    new = fn(core.open_value(state, old))
                else:
                    core.check_writable(state, old)
                verdict, stored = values.judge(name, old, new)
                if verdict is SAME:
                    break  # nothing to write
            swapped = yield from ask(GlobalCas(name, version, stored))
            if swapped is not None:
                break
        if verdict is CHANGED:
            self._fire(state, values.open(stored))
        result: T = new
        return result

    def increment(self, state: GlobalState[T], n: int | float) -> Steps[T]:
        core = self._core
        core.check_usable()
        default = state.default
        for what, number in (("default", default), ("increment", n)):
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise TypeError(
                    f"increment() of global state {state.name!r} needs numbers, but its "
                    f"{what} is a {type(number).__name__}; use update(fn) instead"
                )
        if isinstance(core.values, CheckedObjectValues) or state.version > 1:
            # The store adds without looking: check the sum before it is written (or,
            # for a value with a version, read it as one, and store it with its own).

            def add(value: Any) -> Any:
                return value + n

            return (yield from self.update(state, add, None))
        try:
            value: T = yield from ask(GlobalAdd(state.name, n, default))
        except CodecError as exc:
            if exc.where is None:  # the stored value did not decode: say which state
                raise unreadable(state.name, state.kind, exc) from exc
            raise not_storable(state.name, type(core.store).__name__, exc) from exc
        if n:
            self._fire(state, value)
        return value

    def _fire(self, state: GlobalState[Any], value: Any) -> None:
        if self.watchers is not None:
            self.watchers.global_changed(state.name, value)
        for listener in state.listeners:
            try:
                listener(copy_value(value))
            except Exception:
                logger.exception(
                    "change listener %s of global state %r raised",
                    qualname(listener),
                    state.name,
                )
