"""The memory store's data: a session's record (with its lock), an event's place in a
session's queue, an application's state, shared by its handles, and its globals."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from statekit._locks import AsyncWaiter, Latch

from .base import DeleteReason, Notice, Turn

if TYPE_CHECKING:
    from .memory import _MemoryNamespace

__all__ = ["AppState", "MemoryGlobals", "Queued", "Record", "UserRecord"]


class Record(Latch):
    """A session: its values, lifetime, and lock (``owner``/``waiters``, from Latch).
    ``removed`` once it left the store, for an event that holds it or waits for it."""

    __slots__ = (
        "closed",
        "deadline",
        "order",
        "removed",
        "sid",
        "value_deadlines",
        "values",
        "version",
    )

    def __init__(self, sid: str, deadline: float, order: OrderedDict[str, Record]) -> None:
        self.owner = None  # the Latch's fields, set here rather than by a call
        self.waiters = None
        self.sid = sid
        self.version = 0
        self.closed = False
        self.removed = False
        self.deadline = deadline
        self.values: dict[str, Any] = {}
        self.value_deadlines: dict[str, float] | None = None
        #: The queue it is in, in deadline order: open sessions, closed ones, or users'
        #: records (whose idle span is another).
        self.order = order

    def write(
        self,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float] | None,
        queues: dict[str, OrderedDict[str, float]],
    ) -> int:
        """Under the store's lock: store a commit's values and their deadlines (a value
        written without one has none), kept in order in ``queues`` (one per state, the
        app's); the new version."""
        self.values.update(writes)
        held = self.value_deadlines
        if held:
            for name in held.keys() & writes.keys() - (ttl_deadlines or {}).keys():
                del held[name], queues[name][self.sid]
        if ttl_deadlines:
            if held is None:
                held = self.value_deadlines = {}
            for name, deadline in ttl_deadlines.items():
                queue = queues.get(name)
                if queue is None:
                    queue = queues[name] = OrderedDict()
                elif queue and (last := next(reversed(queue))) != self.sid:
                    # Kept in deadline order (reaping looks at the front only): a commit
                    # whose clock was read before another's (threads racing for the
                    # lock) expires with the one before it.
                    deadline = max(deadline, queue[last])
                held[name] = deadline
                queue[self.sid] = deadline
                queue.move_to_end(self.sid)
        self.version += 1
        return self.version


def eviction_victim(*queues: OrderedDict[str, Record]) -> Record:
    """The record to evict at capacity: from the first of ``queues`` (closed sessions,
    open ones, users' records) with one, its least recently used that no event holds,
    so that an event never loses its own session to an open it causes (its user's
    record, made at capacity); the least recently used at all when events hold them
    all. At least one queue has a record."""
    first = None
    for queue in queues:
        for rec in queue.values():
            if rec.owner is None:
                return rec
            if first is None:
                first = rec
    assert first is not None
    return first


class UserRecord(Record):
    """A user's record (``engine.user_state``): a record of another class, so that the
    engine's fastest path, which checks the class of what it entered, never takes one
    for a session."""

    __slots__ = ()


class Queued(Turn):
    """An event waiting for a session another event holds: wait for the turn
    (:meth:`_MemoryNamespace.wait_turn` in a thread, :meth:`~_MemoryNamespace.await_turn`
    in a task), then :meth:`_MemoryNamespace.enter_after_wait`."""

    __slots__ = ("record", "waiter")

    def __init__(self, record: Record, waiter: threading.Lock | AsyncWaiter) -> None:
        self.record = record
        self.waiter = waiter


class AppState:
    """The data of one application, shared by its handles."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: OrderedDict[str, Record] = OrderedDict()
        self.closed: OrderedDict[str, Record] = OrderedDict()
        self.users: OrderedDict[str, Record] = OrderedDict()
        self.ttl: dict[str, OrderedDict[str, float]] = {}
        self.gone: OrderedDict[str, tuple[DeleteReason, float]] = OrderedDict()
        self.globals: dict[str, tuple[Any, int]] = {}
        self.subscribers: dict[int, tuple[str, Callable[[Notice], None]]] = {}
        # Handles not shut down (nor garbage-collected): the data ends with the last.
        self.handles: weakref.WeakSet[_MemoryNamespace] = weakref.WeakSet()


class MemoryGlobals:
    """A memory namespace's global values (a base of the namespace): each write under
    the application's lock, then a ``global`` notice to the other handles."""

    _lock: threading.Lock
    _globals: dict[str, tuple[Any, int]]
    origin: str

    def _publish(self, notices: Iterable[Notice]) -> None:
        raise NotImplementedError

    def global_get(self, name: str) -> tuple[Any, int] | None:
        return self._globals.get(name)

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        with self._lock:
            current = self._globals.get(name)
            found = None if current is None else current[1]
            if found != version:
                return None
            new_version = 1 if found is None else found + 1
            self._globals[name] = (value, new_version)
        self._publish([Notice(kind="global", sid="", names=(name,), origin=self.origin)])
        return new_version

    def global_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        with self._lock:
            value, version = self._globals.get(name, (default, 0))
            self._globals[name] = (value := value + amount, version + 1)
        self._publish([Notice(kind="global", sid="", names=(name,), origin=self.origin)])
        return value
