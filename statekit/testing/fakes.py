"""Fakes for tests of a logic layer: a clock that moves only when told to, and a memory
store that refuses what a shared store could not write."""

from __future__ import annotations

import math
import threading

from statekit._codec import Codec, JSONCodec
from statekit.stores.memory import MemoryStore

__all__ = ["FakeClock", "checked_store"]


def checked_store(codec: Codec | None = None) -> MemoryStore:
    """A :class:`~statekit.MemoryStore` that checks every value written with ``codec``
    (:class:`~statekit.JSONCodec`, the shared stores' default, if omitted).

    Tests of a logic layer run fast on the memory store, while the app runs on SQLite
    or Redis in production; with this store, a value that production's codec could not
    write (an object JSON cannot carry, a str with a lone surrogate, an int too long to
    write as text) raises :class:`~statekit.ValueNotStorable` in the tests already.
    """
    return MemoryStore(check_values=JSONCodec() if codec is None else codec)


class FakeClock:
    """A clock that only moves when told to.

    Call the instance to read it. Thread-safe.

    Args:
        start: the initial reading, in seconds.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        if not math.isfinite(start):
            raise ValueError(f"FakeClock needs a finite start, got {start!r}")
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` and return the new reading.

        Raises:
            ValueError: if ``seconds`` is negative (clocks used for lifetimes never
                go back) or not finite (a NaN step would stop every lifetime for good).
        """
        if not seconds >= 0 or not math.isfinite(seconds):
            raise ValueError(
                f"FakeClock.advance() needs a finite, non-negative number of seconds, "
                f"got {seconds!r}; a lifetime clock never goes back"
            )
        with self._lock:
            self._now += seconds
            return self._now
