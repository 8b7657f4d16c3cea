"""Checks of what callers pass in: names, durations, callables, session ids.

Written once, used by the engine, the declarations and the registries, so that a bad
argument gets the same clear error wherever it is given.
"""

from __future__ import annotations

import inspect
import math
import re

from .exceptions import InvalidDeclaration, SessionNotFound

__all__ = [
    "MAX_SID_LENGTH",
    "check_callable",
    "check_name",
    "check_seconds",
    "check_sid",
    "qualname",
]

_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
#: The longest session id accepted (ids statekit issues have 32 characters).
MAX_SID_LENGTH = 256


def check_name(name: object, what: str) -> str:
    """A state, registry, app or storage-key name: it becomes part of store keys.

    Raises:
        InvalidDeclaration: not 1 to 128 of ``A-Z a-z 0-9 _ . : / -``.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidDeclaration(
            f"{what} name {name!r} is not valid: use 1 to 128 characters among letters, "
            "digits and _ . : / -"
        )
    return name


def check_seconds(value: object, what: str) -> float:
    """A duration in seconds: a positive, finite number.

    Raises:
        InvalidDeclaration: anything else (a bool included).
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidDeclaration(
            f"{what} must be a positive, finite number of seconds, got {value!r}"
        )
    return float(value)


def check_callable(fn: object, what: str, *, runs: str = "inside the event") -> None:
    """A listener, callback or hook: a plain callable. A coroutine function would only
    make a coroutine that nobody awaits.

    Args:
        what: how the error names it, e.g. ``"on_change() of state 'cart'"``.
        runs: where it runs, for the error's advice.

    Raises:
        InvalidDeclaration: not callable, or a coroutine function.
    """
    if not callable(fn):
        raise InvalidDeclaration(f"{what} needs a callable, got {type(fn).__name__}")
    if inspect.iscoroutinefunction(fn):
        raise InvalidDeclaration(
            f"{what} needs a plain function, got the coroutine function {qualname(fn)}: "
            f"it runs {runs}; start async work from the host instead"
        )


def check_sid(sid: object) -> str:
    """A session id's form (whether the engine issued it is the store's to say).

    Raises:
        SessionNotFound: not a str of 1 to 256 printable ASCII characters, saying why.
    """
    if not isinstance(sid, str):
        raise SessionNotFound(sid, f"a session id is a str, got {type(sid).__name__}")
    if not sid or len(sid) > MAX_SID_LENGTH:
        raise SessionNotFound(sid, f"a session id has 1 to {MAX_SID_LENGTH} characters")
    if not (sid.isascii() and sid.isprintable()):
        raise SessionNotFound(sid, "a session id has printable ASCII characters only")
    return sid


def qualname(fn: object) -> str:
    """A callable's qualified name, for messages and logs."""
    return getattr(fn, "__qualname__", None) or repr(fn)
