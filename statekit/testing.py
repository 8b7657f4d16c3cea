"""Test helpers shipped with statekit.

:class:`FakeClock` replaces the engine's clock so that lifetimes can be tested
without sleeping::

    clock = FakeClock()
    engine = StateEngine(clock=clock, idle_ttl=60)
    sid = engine.open_session()
    clock.advance(61)
    engine.reap()  # the session is gone, its callbacks ran
"""

from __future__ import annotations

import threading

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that only moves when told to.

    Call the instance to read it. Thread-safe.

    Args:
        start: the initial reading, in seconds.
    """

    def __init__(self, start: float = 1_000.0) -> None:
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
                go back).
        """
        if seconds < 0:
            raise ValueError(
                f"FakeClock.advance() needs a non-negative number of seconds, "
                f"got {seconds!r}; a lifetime clock never goes back"
            )
        with self._lock:
            self._now += seconds
            return self._now
