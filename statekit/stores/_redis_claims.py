"""Removals whose reply was lost: made good at the next reap.

A load, peek, reap, open or close can remove expired sessions or values, whose
callbacks run in the engine that receives the reply. When that reply is lost (and the
store's resend gets none either), the request is kept here; the handle's next reap
reads its remembered reply back from the server (``REPLAY``) and hands over what it
removed, so that their callbacks still run, once. Reading back is written as calls
(``_redis_calls``), so that a reap or a shutdown does it on either client.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from statekit import _fork
from statekit.exceptions import StoreUnavailable

from ._redis_calls import Ops, Plan
from ._redis_replies import claims_in
from .base import Ended

__all__ = ["CLAIM_TTL", "LostClaims"]

logger = logging.getLogger("statekit")

#: Seconds the reply of a load or a reap that claimed something is remembered (it
#: holds deleted values): long enough for retries, and for the engine's next look to
#: pick up a reply that was lost.
CLAIM_TTL = 10.0
#: Requests whose lost replies are remembered to read back, at most.
_MOST = 10_000


class LostClaims:
    """Requests that may have claimed entries but whose reply was lost, by request
    key. Thread-safe: two threads reading back at once never both hand one over.

    Args:
        store: names the store in warnings.
    """

    def __init__(self, store: object) -> None:
        self._store = store
        # request key -> (script, session id, when to give up, on the monotonic clock)
        self._lost: dict[str, tuple[str, str, float]] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._lost)

    def add(self, request: str, name: str, sid: str, *, keep: float) -> None:
        """Keep a request of script ``name`` (about ``sid``, or ``""``) whose reply is
        remembered on the server for ``keep`` seconds."""
        with self._lock:
            dropped = None
            if len(self._lost) >= _MOST:
                dropped = self._lost.pop(next(iter(self._lost)))
            self._lost[request] = (name, sid, time.monotonic() + keep)
        if dropped is not None:
            self._warn(dropped[0])

    def resolve(self) -> Ops[list[Ended]]:
        """Read back the replies of the requests kept (``REPLAY`` answers ``[1,
        reply]``, or ``[0]`` when none is remembered any more), and return what they
        claimed. Each request is taken out of the table before it is read (so that two
        threads never both hand its entries over) and put back if the read fails; what
        was read is returned even then, and the rest waits for the next call, until
        too old (then logged)."""
        ended: list[Ended] = []
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._lost:
                    return ended
                request = next(iter(self._lost))
                name, sid, give_up = self._lost.pop(request)
            if now > give_up:
                self._warn(name)
                continue
            try:
                found: list[Any] = yield Plan("REPLAY", [request], [], list)
            except StoreUnavailable:
                with self._lock:
                    self._lost[request] = (name, sid, give_up)
                return ended
            if found[0] == 1:
                ended.extend(claims_in(name, sid, found[1]))

    def forget(self) -> None:
        """In the child of a fork: the parent's requests are the parent's to make good
        (and the lock may look held)."""
        _fork.free_lock(self._lock)
        self._lost.clear()

    def _warn(self, name: str) -> None:
        logger.warning(
            "the reply of a %s request to %s was lost and could not be read back in "
            "time: callbacks of what it removed, if anything, did not run",
            name,
            self._store,
        )
