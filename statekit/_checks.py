"""Checks of what callers pass in: names, durations, callables, session ids.

Written once, used by the engine, the declarations and the registries, so that a bad
argument gets the same clear error wherever it is given.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import inspect
import math
import re

from .exceptions import InvalidDeclaration, SessionNotFound, UsageError

__all__ = [
    "MAX_SID_LENGTH",
    "USER_PREFIX",
    "check_callable",
    "check_name",
    "check_seconds",
    "check_sid",
    "qualname",
    "user_record",
]

_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")
#: The longest session id accepted (ids statekit issues have 32 characters).
MAX_SID_LENGTH = 256
#: How the store ids of user records begin (``engine.user_state``): never a session
#: id's (those statekit issues are URL-safe base64, without a colon).
USER_PREFIX = "u:"
#: The longest user id accepted.
MAX_USER_LENGTH = 1024


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
    if sid.startswith(USER_PREFIX):
        raise SessionNotFound(sid, "this is the id of a user's record, not of a session")
    return sid


def user_record(user: object) -> str:
    """The store id of a user's record: a digest of the user id, so that any id (an
    email address, a number as text) makes a key of one form and length.

    Raises:
        UsageError: not a non-empty str of at most 1,024 characters.
    """
    if not isinstance(user, str) or not user or len(user) > MAX_USER_LENGTH:
        raise UsageError(
            "user= takes the id of the user the host authenticated: a non-empty str of "
            f"at most {MAX_USER_LENGTH} characters, got "
            f"{type(user).__name__ if not isinstance(user, str) else repr(user[:40])}"
        )
    return _digest(str(user))


@functools.lru_cache(maxsize=4096)  # a digest per event would cost more than the event
def _digest(user: str) -> str:
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).digest()
    return USER_PREFIX + base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def qualname(fn: object) -> str:
    """A callable's qualified name, for messages and logs."""
    return getattr(fn, "__qualname__", None) or repr(fn)
