"""The replies of the Redis store's scripts, read into the store protocol's records.

Scripts answer with tagged lists (``{'ok', ...}``, ``{'gone', why}``, ``{'corrupt',
field}``, ...; see ``_redis_scripts``); each function here turns one kind of reply into
what the protocol returns, or raises the error it means. Pure functions of the reply.
"""

from __future__ import annotations

import logging
from typing import Any

from statekit.exceptions import (
    SessionCorrupt,
    SessionExpired,
    SessionNotFound,
    StoreConflict,
    redact,
)

from .base import Busy, DeleteReason, Ended, GivenBack, Gone, Loaded, SessionIdTaken

__all__ = [
    "claims_in",
    "closed",
    "committed",
    "created",
    "ended",
    "loaded",
    "member_sid",
    "num",
    "reaped",
    "text",
    "warn_junk",
]

logger = logging.getLogger("statekit")


def text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def num(value: float) -> str:
    """A time as scripts receive it: Python's exact text of the float."""
    return repr(float(value))


def member_sid(member: bytes | str) -> str:
    """The session id at the start of an index member (or the member itself)."""
    shown = text(member)
    if shown[:2] in ("s\0", "v\0"):
        shown = shown[2:]
    return shown.split("\0", 1)[0]


def ended(reply: list[Any]) -> Ended:
    """A session a script removed: ``{sid, reason, at, closed, {name, value, ...}}``."""
    sid, reason, at, was_closed, flat = reply
    return Ended(
        sid=text(sid),
        reason=DeleteReason(text(reason)),
        values={text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)},
        was_closed=text(was_closed) == "1",
        at=float(at),
    )


def ended_value(reply: list[Any]) -> Ended:
    """A value a script removed at its ttl: ``{sid, 'ttl', at, name, value}``."""
    sid, _ttl, at, name, value = reply
    return Ended(
        sid=text(sid),
        reason=DeleteReason.TTL,
        values={text(name): value},
        state=text(name),
        at=float(at),
    )


def reaped(reply: list[Any]) -> Ended:
    """An entry a reap claimed: a value or a whole session."""
    return ended_value(reply) if text(reply[1]) == "ttl" else ended(reply)


def _gone(sid: str, raw: bytes) -> Gone:
    try:
        reason, at = text(raw).split("\0")
        return Gone(reason=DeleteReason(reason), at=float(at))
    except ValueError:  # not what a script writes: someone else wrote this key
        raise SessionCorrupt(sid, "its record of why it ended is not one statekit wrote") from None


def _corrupt(sid: str, field: Any) -> SessionCorrupt:
    name = text(field)
    shown = "a value deadline" if name.startswith("t:") else f"field {name!r}"
    return SessionCorrupt(sid, f"{shown} of its Redis hash is not a number")


def _ended_here(sid: str, kind: str, reply: list[Any]) -> Gone | None:
    """The answer of a session script that found no session to work on: ``Gone``
    (with ``ended`` set when this very call removed it) or None for an id never
    stored. Raises SessionCorrupt for a session whose data statekit did not write."""
    if kind == "gone":
        return _gone(sid, reply[1])
    if kind == "expired":
        found = ended(reply[1])
        return Gone(reason=found.reason, at=found.at, ended=found)
    if kind == "corrupt":
        raise _corrupt(sid, reply[1])
    if kind == "wrongtype":
        raise SessionCorrupt(sid, "its Redis key holds another type of value")
    if kind == "badgone":
        raise SessionCorrupt(sid, "its record of why it ended is not one statekit wrote")
    return None


def created(reply: list[Any]) -> tuple[tuple[Ended, ...], list[Any]]:
    """What an open evicted, and the capacity entries it dropped as junk.

    Raises:
        SessionIdTaken: the id is stored already.
    """
    if text(reply[0]) == "taken":
        raise SessionIdTaken
    evicted, junk = reply[1], reply[2]
    return tuple(ended(item) for item in evicted), junk


def loaded(sid: str, reply: list[Any]) -> Loaded | Gone | Busy | None:
    """The answer of a load or a peek."""
    kind = text(reply[0])
    if kind == "ok":
        _, version, was_closed, flat, expired = reply[:5]
        return Loaded(
            sid=sid,
            version=int(version),
            closed=text(was_closed) == "1",
            values={text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)},
            expired=tuple(ended_value(item) for item in expired),
        )
    if kind == "busy":
        return Busy(until=float(reply[1]))
    return _ended_here(sid, kind, reply)


def committed(sid: str, version: int, now: float, reply: list[Any]) -> int:
    """The new version after a commit.

    Raises:
        StoreConflict: the version or the lease moved on.
        SessionExpired: the session ended.
        SessionNotFound: the session was never stored, or its data is damaged.
    """
    kind = text(reply[0])
    if kind == "ok":
        return int(reply[1]) if len(reply) == 2 else GivenBack(int(reply[1]))
    if kind == "conflict":
        raise StoreConflict(sid, version, None if reply[1] is None else int(reply[1]))
    gone = _ended_here(sid, kind, reply)
    if gone is None:
        raise SessionNotFound(sid)
    raise SessionExpired(sid, gone.reason.value, max(0.0, now - gone.at))


def closed(sid: str, reply: list[Any]) -> bool | Gone | None:
    """The answer of a close: True when it closed the session, False when it was closed
    already, else as a load answers."""
    kind = text(reply[0])
    if kind in ("closed", "already"):
        return kind == "closed"
    return _ended_here(sid, kind, reply)


def claims_in(name: str, sid: str, reply: list[Any]) -> list[Ended]:
    """The entries a remembered reply of script ``name`` claimed (read back for a
    request whose answer was lost)."""
    kind = text(reply[0]) if reply and not isinstance(reply[0], list) else ""
    if name == "REAP":
        return [reaped(item) for item in reply[0]]
    if name in ("CREATE", "EVICT"):
        return list(created(reply)[0]) if kind == "ok" else []
    if kind == "closed":  # a close that took effect: its hooks are still due
        return [Ended(sid=sid, reason=DeleteReason.CLOSED, values={}, at=0.0)]
    if kind == "expired":
        return [ended(reply[1])]
    if kind == "ok" and name in ("LOAD", "PEEK"):
        return [ended_value(item) for item in reply[4]]
    return []


def warn_junk(store: object, key: str, members: list[Any]) -> None:
    """Log, once per call, the index entries a script removed because they named
    nothing (members hold session ids: only their first characters are shown)."""
    shown = ", ".join(redact(member_sid(m)) for m in members[:3])
    logger.warning(
        "removed %d damaged %s from %r of %s (%s%s): they name no stored session or value",
        len(members),
        "entry" if len(members) == 1 else "entries",
        key,
        store,
        shown,
        ", ..." if len(members) > 3 else "",
    )
