"""The calls a Redis operation makes, written once and run on either client.

An operation of the namespace is a :class:`Plan` — one script call and how to read its
reply — or, when it needs several calls (an open at capacity, a reap, a read that may
need a script, a global's add on a codec the script cannot add with), a generator of
calls (:data:`Ops`) that receives the answer of each: a script (a :class:`Plan`),
plain commands (:class:`Read`) or a pause between two tries (:class:`Pause`). The
namespace runs an operation blocking, or on the store's asyncio client: redis-py's two
clients have the same commands, so one :class:`Read` serves both. :func:`finish`
awaits an operation's calls in the awaiting task, finishing one that a cancellation
interrupted.

The records are plain (not frozen) ``attrs`` records, never changed once made: one or
two are made for every operation, and a frozen one costs twice as much to make.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeAlias, TypeVar

import attrs

from .base import CancelledAfterSending

__all__ = ["Call", "Ops", "Pause", "Plan", "Read", "finish", "in_a_thread", "raw"]

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


async def finish(operation: Plan[_T] | Ops[_T], acall: Callable[[Call], Awaitable[Any]]) -> _T:
    """Run ``operation``, awaiting ``acall`` for each of its calls (a plan's answer, a
    read's reply, a pause), in the awaiting task: the client's own timeouts, which
    cancel the task they run in, stay the client's.

    A cancellation of the task while a call is on its way interrupts that call, which
    may or may not have reached the server; the call is then made again (a script
    under the same request id is answered with its first outcome and applied once; a
    read reads again; a pause is skipped), the operation goes on to its end, and its
    result is raised with the cancellation (:class:`CancelledAfterSending`). A second
    cancellation meanwhile, or a failure to learn the outcome, raises the first
    cancellation as it is."""
    cancelled: asyncio.CancelledError | None = None
    try:
        if isinstance(operation, Plan):
            try:
                result: _T = await acall(operation)
            except asyncio.CancelledError as exc:
                cancelled = exc
                result = await acall(operation)
        else:
            call = operation.send(None)
            while True:
                try:
                    answer = await acall(call)
                except asyncio.CancelledError as exc:
                    if cancelled is not None:
                        raise
                    cancelled = exc
                    try:
                        answer = None if isinstance(call, Pause) else await acall(call)
                    except asyncio.CancelledError:
                        raise
                    except BaseException as error:
                        call = operation.throw(error)
                        continue
                except BaseException as error:
                    call = operation.throw(error)
                    continue
                call = operation.send(answer)
    except StopIteration as stop:
        result = stop.value
    except asyncio.CancelledError:
        if cancelled is None:
            raise
        raise cancelled from None
    except BaseException:
        if cancelled is None:
            raise
        raise cancelled from None  # the outcome is not known: the cancellation stands
    if cancelled is None:
        return result
    raise CancelledAfterSending(result, cancelled) from None


async def in_a_thread(
    drive: Callable[[Plan[_T] | Ops[_T]], _T], operation: Plan[_T] | Ops[_T]
) -> _T:
    """``drive(operation)`` in a worker thread, which a cancellation of the awaiting
    task does not abandon: the task waits for it, then raises the cancellation with its
    result (CancelledAfterSending); a second cancellation stops the wait."""
    run = functools.partial(contextvars.copy_context().run, drive, operation)
    done = asyncio.get_running_loop().run_in_executor(None, run)
    try:
        return await asyncio.shield(done)
    except asyncio.CancelledError as cancelled:
        try:
            result = await done
        except Exception:
            raise cancelled from None
        raise CancelledAfterSending(result, cancelled) from None
