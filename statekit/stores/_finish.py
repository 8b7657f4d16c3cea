"""Awaited store operations that, once they sent something, finish in spite of a
first cancellation of their task.

A store call that has left for the server may be applied there, whether or not the
client reads the reply. If the awaiting task is cancelled then and the call is simply
dropped, a commit may land after the session was given to the next event, and a load
may hold a lease nobody will give back. So an awaited operation, once it has sent
something, runs to its end in spite of a cancellation, and the task takes the
cancellation afterwards.

**Without a task per call.** The store's common case (one script, on a connection that
is ready) runs in the awaiting task itself: the command is written without yielding to
the event loop, and the reply is read with a read that may be interrupted and started
again (the client library's parsers keep what they read). A cancellation that arrives
meanwhile is *absorbed*: noted, and the read goes on. Anything else that waits after
the send (a reconnection, a retry, another call of the same operation) runs in a task
of its own (:func:`finish`), which the cancellation does not reach. A second
cancellation is not absorbed: it interrupts the operation, as it would a task, except
while a worker thread runs the call (``stoppable=False``): nothing stops the thread,
so it is waited for.

**The answer.** :func:`finishing` wraps a whole operation: when it absorbed a
cancellation, it raises :class:`asyncio.CancelledError` once the operation is over (a
plain one, with the first absorbed one's message, so that ``asyncio.timeout`` and task
groups treat it as their own), carrying the operation's answer for the engine to
handle what the call did (a commit landed, a load removed expired values: see
:func:`answer_of`). The cancellation wins over an error the operation ended with.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

__all__ = [
    "IN_THE_TASK",
    "absorb",
    "answer_of",
    "check_unsent",
    "finish",
    "finishing",
    "sent",
    "unsent",
    "unsent_mark",
]

_T = TypeVar("_T")

#: Whether a sent call can finish in the awaiting task: Python 3.11 counts the
#: cancellations asked of a task, which tells one that redis-py's ``asyncio.wait_for``
#: dropped (:func:`check_unsent`); before, each call runs in a task of its own.
IN_THE_TASK = sys.version_info >= (3, 11)

#: The attribute of a ``CancelledError`` that carries an operation's answer.
_ANSWER = "_statekit_answer"


class _Operation:
    """What one awaited operation did so far: sent a call, absorbed a cancellation
    (the first one absorbed, or None)."""

    __slots__ = ("cancelled", "sent")

    def __init__(self) -> None:
        self.sent = False
        self.cancelled: asyncio.CancelledError | None = None

    def cancellation(self) -> asyncio.CancelledError:
        """A new ``CancelledError`` with the first absorbed one's message."""
        assert self.cancelled is not None
        return asyncio.CancelledError(*self.cancelled.args)


_CURRENT: Final[contextvars.ContextVar[_Operation | None]] = contextvars.ContextVar(
    "statekit_store_operation", default=None
)


async def finishing(awaitable: Awaitable[_T]) -> _T:
    """Await one store operation (see the module's docstring): its answer, or, when
    a cancellation arrived after it sent something, a ``CancelledError`` once it is
    over, carrying the answer (none when the operation failed)."""
    state = _Operation()
    token = _CURRENT.set(state)
    try:
        answer = await awaitable
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        if state.cancelled is not None:
            raise state.cancellation() from exc
        raise
    finally:
        _CURRENT.reset(token)
    if state.cancelled is not None:
        cancelled = state.cancellation()
        setattr(cancelled, _ANSWER, answer)
        raise cancelled
    return answer


def sent() -> bool:
    """Note that the current operation sends a call now; whether one runs (outside
    :func:`finishing`, nothing finishes what was sent, and nothing is absorbed)."""
    state = _CURRENT.get()
    if state is None:
        return False
    state.sent = True
    return True


def absorb(cancelled: asyncio.CancelledError) -> None:
    """Note a cancellation that the current operation absorbs, for it to raise once
    over. Raise it at once outside an operation, before the operation sent anything,
    and when it is the second one: a task cancelled again (a server stopping after its
    grace period) stops waiting, and what it sent is left to its fate."""
    state = _CURRENT.get()
    if state is None or not state.sent or state.cancelled is not None:
        raise cancelled
    state.cancelled = cancelled


async def finish(awaitable: Awaitable[_T], *, stoppable: bool = True) -> _T:
    """Await ``awaitable`` to its end in a task of its own, absorbing cancellations of
    the awaiting task: for what waits after a send. Outside :func:`finishing`, or
    before the operation sent anything, it is awaited as is. A second cancellation
    stops it, unless it is not ``stoppable`` (a worker thread runs on whatever the
    task does: it is waited for, so that nothing the engine does next races it)."""
    state = _CURRENT.get()
    if state is None or not state.sent:
        return await awaitable
    task: asyncio.Future[_T] = asyncio.ensure_future(awaitable)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.cancelled():  # the task itself was cancelled (the loop is closing)
                raise
            if state.cancelled is None or not stoppable or task.done():
                # Absorbed (a task already done answers the next await at once).
                state.cancelled = state.cancelled or exc
                continue
            task.cancel()  # the second one reaches the call
            raise


def unsent_mark() -> int | None:
    """Before a step that precedes the operation's first send (taking and connecting a
    connection): the cancellations asked of the task so far, for :func:`check_unsent`;
    None once the operation sent something (what follows runs in :func:`finish`), and
    before Python 3.11 (no count; the engine runs each call in a task of its own)."""
    state = _CURRENT.get()
    return None if state is not None and state.sent else _cancellations()


def check_unsent(mark: int | None) -> None:
    """Raise a cancellation asked since ``mark`` (see :func:`unsent_mark`) that never
    reached the task: before Python 3.12, ``asyncio.wait_for`` (which redis-py sends
    through when a connection has a timeout, as while connecting) drops one that
    arrives as it completes."""
    if mark is not None and (_cancellations() or 0) > mark:
        raise asyncio.CancelledError


def _cancellations() -> int | None:
    """The cancellations asked of the current task (``Task.cancelling()``, Python
    3.11+), or None."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return None if cancelling is None else int(cancelling())


async def unsent(awaitable: Awaitable[_T]) -> _T:
    """Await a step before the operation's first send (a cluster client reading the
    cluster's slots), raising a cancellation it dropped (see :func:`check_unsent`)."""
    mark = unsent_mark()
    result = await awaitable
    check_unsent(mark)
    return result


def answer_of(cancelled: asyncio.CancelledError) -> tuple[bool, Any]:
    """Whether ``cancelled`` carries the answer of an operation that finished before
    the cancellation took effect, and the answer (which it no longer holds)."""
    try:
        answer = cancelled.__dict__.pop(_ANSWER)
    except KeyError:
        return False, None
    return True, answer
