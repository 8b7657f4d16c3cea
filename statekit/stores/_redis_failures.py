"""What a failed Redis request means: the server unreachable (and whether the request
may have been applied), or data statekit did not write.

One decision serves the blocking client and the asyncio one: :class:`Attempts` is
iterated by both ``RedisStore.run`` and ``RedisStore.arun``, and each attempt, a
context manager, judges the failure that ends it — send once more, or raise the error
that says what happened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from statekit.exceptions import StateError, StoreUnavailable

__all__ = [
    "UNAVAILABLE",
    "Attempts",
    "DamagedKey",
    "after_lost",
    "before_send",
    "default_retry",
    "is_damage",
    "maybe_applied",
    "read_failure",
    "safe_url",
    "unavailable",
]

#: Failures that mean the server could not be reached (or did not answer in time).
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException)


#: The mark of a failure the store itself knows came before anything was sent.
_NOT_SENT = "_statekit_not_sent"


def not_sent(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised before the request left (see :func:`before_send`)."""
    setattr(exc, _NOT_SENT, True)
    return exc


#: The mark of an error reply to a request sent again after an earlier send of it was
#: lost (see :func:`after_lost`).
_AFTER_LOST = "_statekit_after_lost"


def maybe_applied(exc: BaseException) -> bool:
    """Whether the request ``exc`` failed may have been applied: a failure after it may
    have left (see :func:`before_send`), or an error reply marked :func:`after_lost`
    (any other error reply refused it)."""
    if isinstance(exc, ResponseError):
        return bool(getattr(exc, _AFTER_LOST, False))
    return not before_send(exc)


def after_lost(exc: BaseException) -> BaseException:
    """Mark ``exc``, an error reply, as the answer to a request sent again after an
    earlier send of it may have been applied (its reply lost with the connection): the
    error says nothing of that first send, so the outcome is unknown."""
    setattr(exc, _AFTER_LOST, True)
    return exc


def before_send(exc: BaseException) -> bool:
    """Whether a connection failure happened while the client was still getting a
    connection for the request, so that nothing of it was sent (or the store marked
    it so, with :func:`not_sent`).

    redis-py's ``Redis`` takes a connection from its pool (connecting it if needed)
    before sending anything and before its own retries begin; a failure there is raised
    from the pool's ``get_connection``. Any other failure may come after the request
    left, or after an earlier attempt of a retrying client did: then the outcome is
    unknown. A cluster client takes connections inside its retry loop, so with one the
    outcome is always unknown. When in doubt, this answers False (unknown).
    """
    if getattr(exc, _NOT_SENT, False):
        return True
    tb: TracebackType | None = exc.__traceback__
    found = False
    while tb is not None:
        frame = tb.tb_frame
        if "cluster" in frame.f_code.co_filename.rsplit("/", 1)[-1]:
            return False
        if (
            frame.f_code.co_name == "get_connection"
            and "Pool" in type(frame.f_locals.get("self")).__name__
        ):
            found = True
        tb = tb.tb_next
    return found


def is_damage(exc: BaseException) -> bool:
    """Whether an error reply to a plain read means that the key read holds another
    type of value than statekit writes there: its error code (by the Redis protocol,
    the reply's first word, before any message) is ``WRONGTYPE``. redis-py has no class
    for it; other bare replies (``BUSY`` while a long script runs elsewhere, a proxy's
    ``ERR``) mean the server cannot answer now, not that data is damaged."""
    if type(exc) is not ResponseError:
        return False
    text = str(exc)
    return text.split(" ", 1)[0] == "WRONGTYPE" if text else False


def read_failure(store: str, exc: BaseException, damaged: Callable[[], Exception]) -> Exception:
    """The error for a plain read (not a script) that failed: ``damaged()`` when the
    key read holds another type of value (see :func:`is_damage`)."""
    if isinstance(exc, UNAVAILABLE):
        return unavailable(store, exc)
    if is_damage(exc):
        return damaged()
    return StoreUnavailable(store, f"{type(exc).__name__}: {exc}")


def default_retry() -> Retry:
    """Three quick retries after a lost connection, or a refusal by a master demoted to a
    replica (``READONLY``, on a connection made before a switch-over, to an address
    that now leads to the new master: the retry reconnects): harmless, every write
    being idempotent (and ``READONLY`` refusing before anything is written), and they
    carry a request over a server restart or a failover. Not after a timeout: a server
    too slow to answer is not asked again."""
    return Retry(
        EqualJitterBackoff(cap=0.5, base=0.01),
        3,
        supported_errors=(RedisConnectionError, ReadOnlyError),
    )


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def unavailable(store: str, exc: BaseException, *, unknown: bool = False) -> StoreUnavailable:
    """The error for a server that could not be reached; ``unknown``: the request may
    have been applied."""
    return StoreUnavailable(store, f"{type(exc).__name__}: {exc}", outcome_unknown=unknown)


class DamagedKey(StoreUnavailable):
    """A key statekit uses holds another type of value (someone else wrote it). Raised
    for the app's indexes, which every write needs: the app cannot be served until an
    operator deletes the key. Nothing was written.

    Attributes:
        key: the damaged key.
    """

    def __init__(self, store: str, key: str) -> None:
        self.store = store
        self.key = key
        self.outcome_unknown = False
        StateError.__init__(
            self,
            f"{store} holds damaged data (the key {key!r} holds another type of value "
            "than statekit writes there): nothing was written; an operator must delete "
            "the damaged key for this app to be served again",
        )


class Attempts:
    """The sends of one script call, at most two, and what a failure means.

    Iterate, and run the call inside each attempt (``with attempt:``); the loop ends
    with the first answer. An attempt that fails after the request may have left (a
    lost connection) lets the loop send it once more: every script that writes is
    idempotent, so the answer, if one comes, is the first outcome. Any other failure
    raises :class:`~statekit.StoreUnavailable`, saying ``outcome_unknown`` when the
    request applies the caller's own write (``applies``) and may have been applied;
    when it may have been applied at all, ``lost()`` is called first (for claims to be
    made good later). An error reply of the server raises StoreUnavailable too:
    nothing was applied, unless an earlier send of the request was lost (then as
    above). Not thread-safe: one per call.
    """

    __slots__ = ("_applies", "_left", "_lost", "_sent", "_store")

    def __init__(
        self, store: str, *, applies: bool, lost: Callable[[], object] | None = None
    ) -> None:
        self._store = store
        self._applies = applies
        self._lost = lost
        self._sent = False
        self._left = 2

    def __iter__(self) -> Attempts:
        return self

    def __next__(self) -> Attempts:
        if not self._left:
            raise StopIteration
        self._left -= 1
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if isinstance(exc, UNAVAILABLE):
            self._sent = self._sent or not before_send(exc)
            # Sent again only after a lost connection: a server too slow to answer in
            # time is not asked twice, and one never reached is the client's to retry.
            if self._left and self._sent and not isinstance(exc, RedisTimeoutError):
                return True
            if self._sent and self._lost is not None:
                self._lost()
            raise unavailable(self._store, exc, unknown=self._applies and self._sent) from exc
        if isinstance(exc, RedisError):
            # An error reply: not applied, unless an earlier send of the request was
            # lost (this attempt's, or one before it), which may have been.
            maybe = self._sent or getattr(exc, _AFTER_LOST, False)
            if maybe and self._lost is not None:
                self._lost()
            raise StoreUnavailable(
                self._store,
                f"{type(exc).__name__}: {exc}",
                outcome_unknown=self._applies and maybe,
            ) from exc
        # A call a second cancellation interrupted may have been applied: what it
        # claimed is read back by the next reap, as after a lost reply.
        lost = self._lost
        if lost is not None and isinstance(exc, asyncio.CancelledError) and not before_send(exc):
            lost()
        return False
