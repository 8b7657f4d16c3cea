"""Running test code in many threads at once, and waiting for a condition, bounded in
time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

THREADS = 8
JOIN_TIMEOUT = 60


def run_threads(target: Callable[[int], None], n: int = THREADS) -> None:
    """Run ``target(k)`` for k in range(n), all released at once; fail on any error,
    and on any thread still running after JOIN_TIMEOUT seconds (a deadlock)."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def wrapped(k: int) -> None:
        start.wait()
        try:
            target(k)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "deadlock: threads still running"
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
