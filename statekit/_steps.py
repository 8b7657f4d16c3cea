"""Store work written once, run blocking or async: typed store calls and their drivers.

An operation that talks to a store (loading a session with its lease, committing and
running listener rounds, checking a session) is written as a generator of *steps*: it
yields a :class:`StoreCall` record and receives its result. :func:`drive` runs the
steps with the store's blocking methods; :func:`adrive` awaits the store's async
methods (:class:`~statekit.stores.base.AsyncStoreNamespace`) or, for another shared
store, runs the blocking ones in a worker thread; a store of this process is called
directly. The rules (leases, commits, listener rounds) so exist once for both.

Inside steps, ``result = yield from ask(call)`` gives ``result`` the call's own type,
so mypy checks every store call and what is done with its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Generator, Mapping
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

from .stores.base import AsyncStoreNamespace, Busy, Gone, Lease, Loaded, StoreNamespace

__all__ = [
    "Commit",
    "LoadSession",
    "Release",
    "Sleep",
    "Steps",
    "StoreCall",
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
        """The call as a coroutine of the namespace's async method; None when there is
        none (the driver then runs :meth:`run` in a worker thread)."""
        return None


@attrs.frozen(kw_only=True, slots=True)
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


@attrs.frozen(kw_only=True, slots=True)
class Commit(StoreCall[int]):
    """:meth:`~statekit.stores.StoreNamespace.commit`."""

    sid: str
    version: int
    writes: Mapping[str, Any]
    ttl_deadlines: Mapping[str, float]
    now: float
    lease: str | None
    release: bool

    def run(self, ns: StoreNamespace) -> int:
        return ns.commit(
            self.sid,
            version=self.version,
            writes=self.writes,
            ttl_deadlines=self.ttl_deadlines,
            now=self.now,
            lease=self.lease,
            release=self.release,
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
        )


@attrs.frozen(kw_only=True, slots=True)
class Release(StoreCall[None]):
    """:meth:`~statekit.stores.StoreNamespace.release`."""

    sid: str
    lease: str

    def run(self, ns: StoreNamespace) -> None:
        ns.release(self.sid, lease=self.lease)

    def arun(self, ns: AsyncStoreNamespace) -> Coroutine[Any, Any, None]:
        return ns.arelease(self.sid, lease=self.lease)


@attrs.frozen(kw_only=True, slots=True)
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


class _Finished:
    """What steps returned, once they are done."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _advance(steps: Steps[Any], answer: Any, failed: bool) -> StoreCall[Any] | _Finished:
    """Hand a call's answer (or, when it ``failed``, its exception, which the steps may
    handle) to the steps; their next call, or what they returned."""
    try:
        return steps.throw(answer) if failed else steps.send(answer)
    except StopIteration as stop:
        return _Finished(stop.value)


def drive(steps: Steps[R], ns: StoreNamespace) -> R:
    """Run ``steps`` with the namespace's blocking methods. An exception a call raises
    is thrown into the steps, which may handle it."""
    step = _advance(steps, None, False)
    while not isinstance(step, _Finished):
        try:
            answer, failed = step.run(ns), False
        except BaseException as exc:
            answer, failed = exc, True
        step = _advance(steps, answer, failed)
    value: R = step.value
    return value


async def adrive(
    steps: Steps[R],
    ns: StoreNamespace,
    *,
    async_ns: AsyncStoreNamespace | None,
    shared: bool,
    salvage: Callable[[Any], object],
) -> R:
    """Run ``steps`` without blocking the event loop: the async methods of
    ``async_ns`` (the same namespace, when it has them), a worker thread for another
    shared store, a direct call for a store of this process (which does no I/O).

    A call that was sent finishes even if the task is cancelled meanwhile (see
    :func:`_to_the_end`); ``salvage`` receives what it answered then.
    """
    step = _advance(steps, None, False)
    while not isinstance(step, _Finished):
        try:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                answer, failed = None, False
            elif async_ns is not None and (coro := step.arun(async_ns)) is not None:
                answer, failed = await _to_the_end(coro, salvage), False
            elif shared:
                answer = await _to_the_end(asyncio.to_thread(step.run, ns), salvage)
                failed = False
            else:
                answer, failed = step.run(ns), False
        except BaseException as exc:
            answer, failed = exc, True
        step = _advance(steps, answer, failed)
    value: R = step.value
    return value


async def _to_the_end(call: Coroutine[Any, Any, R], salvage: Callable[[Any], object]) -> R:
    """Await a store call that, once sent, finishes even if the awaiting task is
    cancelled: the task waits for it (keeping the session's lock meanwhile), then takes
    the cancellation. Otherwise a cancelled commit could land after the lock was given
    to the next event. What the finished call answered goes to ``salvage`` (a load may
    have removed expired entries, whose callbacks are due)."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            salvage(await task)
        raise
