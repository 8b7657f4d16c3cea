"""Store work written once, run blocking or async: typed store calls and their drivers.

Every operation that talks to a store (opening, closing and checking a session,
peeking at a value, loading a session with its lease and renewing it, committing and
running listener rounds, reaping, a global's read-modify-write, the end of an engine)
is written as a generator of *steps*: it yields a :class:`StoreCall` record and
receives its result.
:func:`drive` runs the steps with the store's blocking methods; :func:`adrive` awaits
the store's async methods (:class:`~statekit.stores.base.AsyncStoreNamespace`) or, for
another shared store, runs the blocking ones in a worker thread; a store of this
process is called directly. The rules (leases, commits, listener rounds, eviction
callbacks) so exist once for both. What the steps do between two calls — callbacks,
hooks, listeners — runs in the thread that drives them: the caller's, or the event
loop's.

Inside steps, ``result = yield from ask(call)`` gives ``result`` the call's own type,
so mypy checks every store call and what is done with its result.

The records are plain ``attrs.define`` records, never changed once yielded, whose
fields may be passed in order: the fast paths of the memory store (a peek, an open, a
global) make theirs positionally. A frozen record costs twice as much to make, and
each keyword argument a few hundredths of a microsecond, on operations of one or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

from .stores._finish import answer_of
from .stores.base import (
    AsyncStoreNamespace,
    Busy,
    CommitPart,
    Ended,
    Gone,
    Keep,
    Lease,
    Loaded,
    StoreNamespace,
)

__all__ = [
    "CloseSession",
    "Commit",
    "CommitJoint",
    "CreateSession",
    "GlobalAdd",
    "GlobalCas",
    "GlobalGet",
    "LoadSession",
    "Peek",
    "Reap",
    "Release",
    "Renew",
    "SessionCount",
    "Shutdown",
    "Sleep",
    "Steps",
    "StoreCall",
    "acall",
    "adrive",
    "ask",
    "drive",
]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class StoreCall(Generic[R_co]):
    """One call a step asks of the store; ``R_co`` is what it answers."""

    __slots__ = ()

    def run(self, ns: StoreNamespace) -> R_co:
        """Make the call with the namespace's blocking method."""
        raise NotImplementedError

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, R_co] | None:
        """The call as a coroutine of the namespace's async method; None for a call
        with none (the driver then runs :meth:`run` in a worker thread)."""
        return None


@attrs.define(slots=True)
class LoadSession(StoreCall["Loaded | Gone | Busy | None"]):
    """:meth:`~statekit.stores.StoreNamespace.load_session`."""

    sid: str
    now: float
    touch_until: float | None
    lease: Lease | None = None

    def run(self, ns: StoreNamespace) -> Loaded | Gone | Busy | None:
        return ns.load_session(
            self.sid, now=self.now, touch_until=self.touch_until, lease=self.lease
        )

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, Loaded | Gone | Busy | None]:
        return ns.aload_session(
            self.sid, now=self.now, touch_until=self.touch_until, lease=self.lease
        )


@attrs.define(slots=True)
class Commit(StoreCall[int]):
    """:meth:`~statekit.stores.StoreNamespace.commit`."""

    sid: str
    version: int
    writes: Mapping[str, Any]
    ttl_deadlines: Mapping[str, float]
    now: float
    lease: str | None
    release: bool
    keep: Keep | None = None

    def run(self, ns: StoreNamespace) -> int:
        return ns.commit(
            self.sid,
            version=self.version,
            writes=self.writes,
            ttl_deadlines=self.ttl_deadlines,
            now=self.now,
            lease=self.lease,
            release=self.release,
            keep=self.keep,
        )

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, int]:
        return ns.acommit(
            self.sid,
            version=self.version,
            writes=self.writes,
            ttl_deadlines=self.ttl_deadlines,
            now=self.now,
            lease=self.lease,
            release=self.release,
            keep=self.keep,
        )


@attrs.define(slots=True)
class CommitJoint(StoreCall["tuple[int, ...]"]):
    """``commit_joint`` of a store whose ``joint_commits`` is true."""

    parts: tuple[CommitPart, ...]
    now: float

    def run(self, ns: StoreNamespace) -> tuple[int, ...]:
        joint: Callable[..., tuple[int, ...]] = getattr(ns, "commit_joint")  # noqa: B009
        return joint(self.parts, now=self.now)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, tuple[int, ...]] | None:
        joint = getattr(ns, "acommit_joint", None)
        return None if joint is None else joint(self.parts, now=self.now)


@attrs.define(slots=True)
class Release(StoreCall[None]):
    """:meth:`~statekit.stores.StoreNamespace.release`."""

    sid: str
    lease: str

    def run(self, ns: StoreNamespace) -> None:
        ns.release(self.sid, lease=self.lease)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, None]:
        return ns.arelease(self.sid, lease=self.lease)


@attrs.define(slots=True)
class Renew(StoreCall[bool]):
    """:meth:`~statekit.stores.StoreNamespace.renew`."""

    sid: str
    lease: str
    until: float

    def run(self, ns: StoreNamespace) -> bool:
        return ns.renew(self.sid, lease=self.lease, until=self.until)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, bool]:
        return ns.arenew(self.sid, lease=self.lease, until=self.until)


@attrs.define(slots=True)
class CreateSession(StoreCall["tuple[Ended, ...]"]):
    """:meth:`~statekit.stores.StoreNamespace.create_session`."""

    sid: str
    now: float
    deadline: float
    capacity: int

    def run(self, ns: StoreNamespace) -> tuple[Ended, ...]:
        return ns.create_session(
            self.sid, now=self.now, deadline=self.deadline, capacity=self.capacity
        )

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, tuple[Ended, ...]]:
        return ns.acreate_session(
            self.sid, now=self.now, deadline=self.deadline, capacity=self.capacity
        )


@attrs.define(slots=True)
class Peek(StoreCall["Loaded | Gone | None"]):
    """:meth:`~statekit.stores.StoreNamespace.peek`."""

    sid: str
    name: str
    now: float
    touch_until: float | None

    def run(self, ns: StoreNamespace) -> Loaded | Gone | None:
        return ns.peek(self.sid, self.name, now=self.now, touch_until=self.touch_until)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, Loaded | Gone | None]:
        return ns.apeek(self.sid, self.name, now=self.now, touch_until=self.touch_until)


@attrs.define(slots=True)
class CloseSession(StoreCall["bool | Gone | None"]):
    """:meth:`~statekit.stores.StoreNamespace.close_session`."""

    sid: str
    now: float
    deadline: float

    def run(self, ns: StoreNamespace) -> bool | Gone | None:
        return ns.close_session(self.sid, now=self.now, deadline=self.deadline)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, bool | Gone | None]:
        return ns.aclose_session(self.sid, now=self.now, deadline=self.deadline)


@attrs.define(slots=True)
class Reap(StoreCall["tuple[Ended, ...]"]):
    """:meth:`~statekit.stores.StoreNamespace.reap`."""

    now: float
    limit: int

    def run(self, ns: StoreNamespace) -> tuple[Ended, ...]:
        return ns.reap(now=self.now, limit=self.limit)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, tuple[Ended, ...]]:
        return ns.areap(now=self.now, limit=self.limit)


@attrs.define(slots=True)
class SessionCount(StoreCall[int]):
    """:meth:`~statekit.stores.StoreNamespace.session_count`."""

    def run(self, ns: StoreNamespace) -> int:
        return ns.session_count()

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, int]:
        return ns.asession_count()


@attrs.define(slots=True)
class GlobalGet(StoreCall["tuple[Any, int] | None"]):
    """:meth:`~statekit.stores.StoreNamespace.global_get`."""

    name: str

    def run(self, ns: StoreNamespace) -> tuple[Any, int] | None:
        return ns.global_get(self.name)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, tuple[Any, int] | None]:
        return ns.aglobal_get(self.name)


@attrs.define(slots=True)
class GlobalCas(StoreCall["int | None"]):
    """:meth:`~statekit.stores.StoreNamespace.global_cas`."""

    name: str
    version: int | None
    value: Any

    def run(self, ns: StoreNamespace) -> int | None:
        return ns.global_cas(self.name, version=self.version, value=self.value)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, int | None]:
        return ns.aglobal_cas(self.name, version=self.version, value=self.value)


@attrs.define(slots=True)
class GlobalAdd(StoreCall[Any]):
    """:meth:`~statekit.stores.StoreNamespace.global_add`."""

    name: str
    amount: int | float
    default: int | float

    def run(self, ns: StoreNamespace) -> Any:
        return ns.global_add(self.name, self.amount, default=self.default)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, Any]:
        return ns.aglobal_add(self.name, self.amount, default=self.default)


@attrs.define(slots=True)
class Shutdown(StoreCall["tuple[Ended, ...]"]):
    """:meth:`~statekit.stores.StoreNamespace.shutdown`."""

    def run(self, ns: StoreNamespace) -> tuple[Ended, ...]:
        return ns.shutdown()

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, tuple[Ended, ...]]:
        return ns.ashutdown()


@attrs.define(slots=True)
class Sleep(StoreCall[None]):
    """A pause between two tries (no store call): ``time.sleep`` or ``asyncio.sleep``."""

    seconds: float

    def run(self, ns: StoreNamespace) -> None:
        time.sleep(self.seconds)


Steps: TypeAlias = Generator[StoreCall[Any], Any, R]
"""Steps that end with an ``R``."""


def ask(call: StoreCall[R]) -> Generator[StoreCall[R], R, R]:
    """Yield one store call and return its result, typed: ``x = yield from ask(c)``."""
    return (yield call)


def drive(steps: Steps[R], ns: StoreNamespace) -> R:
    """Run ``steps`` with the namespace's blocking methods. An exception a call raises
    is thrown into the steps, which may handle it."""
    try:
        call = steps.send(None)
        while True:
            try:
                answer = call.run(ns)
            except BaseException as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(answer)
    except StopIteration as stop:
        value: R = stop.value
        return value


async def adrive(
    steps: Steps[R],
    ns: StoreNamespace,
    *,
    async_ns: AsyncStoreNamespace | None,
    shared: bool,
    salvage: Callable[[StoreCall[Any], Any], object],
) -> R:
    """Run ``steps`` without blocking the event loop: the async methods of
    ``async_ns`` (the same namespace, when it has them), a worker thread for another
    shared store, a direct call for a store of this process (which does no I/O). An
    exception a call raises is thrown into the steps, as :func:`drive` does.

    A call that was sent finishes even if the task is cancelled meanwhile, and the
    task then takes the cancellation: in the task itself, when the namespace's calls
    do so (``finishes_sent_calls``, see ``stores._finish``), else in a task of their
    own (:func:`_to_the_end`). ``salvage`` receives the call and what it answered.
    """
    try:
        call = steps.send(None)
        while True:
            try:
                if isinstance(call, Sleep):
                    await asyncio.sleep(call.seconds)
                    answer = None
                else:
                    answer = await acall(
                        call, ns, async_ns=async_ns, shared=shared, salvage=salvage
                    )
            except BaseException as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(answer)
    except StopIteration as stop:
        value: R = stop.value
        return value


async def acall(
    call: StoreCall[R],
    ns: StoreNamespace,
    *,
    async_ns: AsyncStoreNamespace | None,
    shared: bool,
    salvage: Callable[[StoreCall[Any], Any], object],
) -> R:
    """One store call as :func:`adrive` runs each (the engine's direct calls, outside
    steps, take the same way)."""
    if async_ns is not None and (coro := call.arun(async_ns)) is not None:
        if getattr(async_ns, "finishes_sent_calls", False):
            return await _finished(coro, call, salvage)
        return await _to_the_end(coro, call, salvage)
    if shared:
        thread = asyncio.to_thread(call.run, ns)
        return await _to_the_end(thread, call, salvage, stoppable=False)
    return call.run(ns)


async def _finished(
    call: Coroutine[Any, Any, R],
    step: StoreCall[R],
    salvage: Callable[[StoreCall[Any], Any], object],
) -> R:
    """Await a store call that finishes what it sent by itself (see ``stores._finish``):
    a cancellation it absorbed comes after, with the call's answer for ``salvage``."""
    try:
        return await call
    except asyncio.CancelledError as cancelled:
        finished, answer = answer_of(cancelled)
        if finished:
            with contextlib.suppress(BaseException):
                salvage(step, answer)
        raise


async def _answered(call: Coroutine[Any, Any, R]) -> R:
    """``call``'s answer, also when it finished its operation under a cancellation of
    its own task and then raised it, answer attached (see ``stores._finish``): the task
    running it ends with the answer, for :func:`_to_the_end` to salvage."""
    try:
        return await call
    except asyncio.CancelledError as cancelled:
        finished, answer = answer_of(cancelled)
        if not finished:
            raise
        value: R = answer
        return value


async def _to_the_end(
    call: Coroutine[Any, Any, R],
    step: StoreCall[R],
    salvage: Callable[[StoreCall[Any], Any], object],
    *,
    stoppable: bool = True,
) -> R:
    """Await a store call that, once sent, finishes even if the awaiting task is
    cancelled: the task waits for it (keeping the session's lock meanwhile), then takes
    the cancellation. Otherwise a cancelled commit could land after the lock was given
    to the next event. The call and what it answered go to ``salvage`` (a load may
    have removed expired entries, a close ended a session: their callbacks are due).
    A second cancellation stops the wait, unless the call is not ``stoppable`` (one a
    worker thread runs: the thread goes on, and a lease it takes must not be given
    back before it did)."""
    task = asyncio.ensure_future(_answered(call))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await (asyncio.shield(task) if not stoppable else task)
            except asyncio.CancelledError:
                if stoppable:
                    break
        if task.done() and not task.cancelled() and task.exception() is None:
            with contextlib.suppress(BaseException):
                salvage(step, task.result())
        raise
