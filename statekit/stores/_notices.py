"""The subscribers of a shared store's namespace handle, and the thread feeding them.

Both shared stores deliver notices the same way: the first subscriber starts a daemon
thread running the store's own receive loop (a pub/sub listener, a table poller), the
last unsubscribe stops it, and each notice goes to every subscriber, a subscriber that
raises being logged and skipped.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from .base import Notice

__all__ = ["NoticeFeed"]

logger = logging.getLogger("statekit")

#: A receive loop: runs until ``stop`` is set, sets ``ready`` once it listens, and
#: hands each notice to ``deliver``.
ReceiveLoop = Callable[[threading.Event, threading.Event, Callable[[Notice], None]], None]


class NoticeFeed:
    """Subscribers plus the thread that feeds them. Thread-safe."""

    def __init__(self, name: str, receive: ReceiveLoop, *, ready_timeout: float = 5.0) -> None:
        self._name = name
        self._receive = receive
        self._ready_timeout = ready_timeout
        self._subscribers: dict[int, Callable[[Notice], None]] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Add a subscriber (starting the thread if needed); return its unsubscribe."""
        key = next(self._keys)
        with self._lock:
            self._subscribers[key] = callback
            if self._thread is None:
                self._stop = threading.Event()
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._receive,
                    args=(self._stop, ready, self.deliver),
                    name=self._name,
                    daemon=True,
                )
                self._thread.start()
                ready.wait(self._ready_timeout)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)
                if self._subscribers:
                    return
            self.stop()

        return unsubscribe

    def deliver(self, notice: Notice) -> None:
        """Hand ``notice`` to every subscriber; one that raises is logged and skipped."""
        for callback in list(self._subscribers.values()):
            try:
                callback(notice)
            except Exception:
                logger.exception("store notice subscriber raised")

    def stop(self) -> None:
        """Drop every subscriber and stop the thread (waiting briefly for it)."""
        with self._lock:
            self._subscribers.clear()
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
