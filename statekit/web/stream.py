"""A tab's change stream as Server-Sent Events (``GET <prefix>/watch``).

The page opens ``new EventSource(kit.url(prefix + "/watch"))`` (``statekit.js`` does,
with ``StateKit.start({watch: true})``); the server answers ``text/event-stream`` and
sends, for each change of the tab's session, of its user's user states and of the
globals the app chose to stream
(``SessionGate(streams=[...])``), one event::

    event: change
    data: {"scope": "session", "state": "cart", "value": [...], "missed": 0}

``value`` is the value in statekit's tagged JSON (the default codec's format: JSON's
own types as they are, ``{"$tuple": [...]}`` and the like for the rest); ``scope`` is
``"session"``, ``"user"`` (the user states of the user the host authenticated
for the stream's request) or ``"global"``; ``missed`` says how many changes before this one were
dropped because the page read too slowly. The session's id is never sent. A comment
line every 15 s keeps proxies from closing an idle stream; when the stream ends (the
session ended, the engine shut down over a store of its process) a last ``event:
end`` is sent, with why (``data: {"reason": "idle"}``: a reason of
``X-Statekit-Session-Ended``, or ``"unknown"`` for a session that was not live), and the
page should not reconnect; it learns its session ended. A stream that ends otherwise
(the engine shut down over a shared store, where the session lives on) just ends, and
the page's ``EventSource`` reconnects.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from statekit._codec import JSONCodec
from statekit._watch import StateChange, Watch

__all__ = ["HEARTBEAT", "STREAM_HEADERS", "change_event", "server_sent_events"]

logger = logging.getLogger("statekit")

#: Seconds between two keep-alive comments on an idle stream.
HEARTBEAT = 15.0

#: The headers of the stream's answer (``200``).
STREAM_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
}

_CODEC = JSONCodec()


def change_event(change: StateChange) -> bytes | None:
    """One change as a Server-Sent Event; None (logged) for a value JSON cannot
    carry."""
    try:
        value = _CODEC.encode(change.value).decode("utf-8")
    except Exception as exc:
        logger.warning("a change of state %r was not streamed: %s", change.state, exc)
        return None
    head = json.dumps({"scope": change.scope, "state": change.state})
    data = f'{head[:-1]}, "value": {value}, "missed": {change.missed}}}'
    return f"event: change\ndata: {data}\n\n".encode()


async def server_sent_events(
    watch: Watch, *, heartbeat: float = HEARTBEAT
) -> AsyncIterator[bytes]:
    """The stream's bytes, chunk by chunk, until ``watch`` ends (then ``event: end``).
    Closing the iterator (the page went away) closes the watch."""
    try:
        yield b"retry: 3000\n\n"
        while True:
            try:
                change = await asyncio.wait_for(anext(watch), heartbeat)
            except asyncio.TimeoutError:  # (not the builtin one before Python 3.11)
                yield b": idle\n\n"
                continue
            except StopAsyncIteration:
                if watch.ended is not None:
                    reason = json.dumps({"reason": watch.ended})
                    yield f"event: end\ndata: {reason}\n\n".encode()
                return
            event = change_event(change)
            if event is not None:
                yield event
    finally:
        watch.close()
