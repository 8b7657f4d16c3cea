"""The subscribers of a shared store's namespace handle, and the thread feeding them.

Both shared stores deliver notices the same way: the first subscriber starts a daemon
thread running the store's own receive loop (a pub/sub listener, a table poller), the
last unsubscribe stops it, and each notice goes to every subscriber, a subscriber that
raises being logged and skipped. In the child of a fork the thread is started again
for the subscribers the child inherited, and they are sent a ``resync`` notice once it
listens: notices published before then were missed.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable

from statekit import _fork

from .base import Notice

__all__ = ["NoticeFeed"]

logger = logging.getLogger("statekit")

#: A receive loop: runs until ``stop`` is set, sets ``ready`` once it listens, and
#: hands each notice to ``deliver``.
ReceiveLoop = Callable[[threading.Event, threading.Event, Callable[[Notice], None]], None]


class _Ready(threading.Event):
    """Set by a receive loop once it listens (maybe again after each reconnection);
    runs ``then`` in the loop's thread the first time."""

    def __init__(self, then: Callable[[], None] | None) -> None:
        super().__init__()
        self._then = then

    def set(self) -> None:
        then, self._then = self._then, None
        super().set()
        if then is not None:
            then()


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
        _fork.after_fork_in_child(self)
        _fork.restart_after_fork(self)

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        """Add a subscriber (starting the thread if needed); return its unsubscribe."""
        key = next(self._keys)
        with self._lock:
            self._subscribers[key] = callback
            if self._thread is None or not self._thread.is_alive():  # (a loop that died)
                self._start()

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)
                if self._subscribers:
                    return
            self.stop()

        return unsubscribe

    def _start(self, *, after_fork: bool = False) -> None:
        """Under the lock: start the thread. Normally wait until it listens; after a
        fork, do not wait (the child's startup must not hang on a slow store), and
        tell every subscriber, once it listens, that notices may have been missed."""
        self._stop = threading.Event()
        ready = _Ready(self._resync if after_fork else None)
        self._thread = threading.Thread(
            target=self._receive,
            args=(self._stop, ready, self.deliver),
            name=self._name,
            daemon=True,
        )
        self._thread.start()
        if not after_fork:
            ready.wait(self._ready_timeout)

    def _resync(self) -> None:
        self.deliver(Notice(kind="resync", sid="", origin="fork"))

    def _after_fork(self) -> None:
        """In the child of a fork: the thread is gone, the lock may look held."""
        _fork.free_lock(self._lock)
        self._thread = None

    def _restart_after_fork(self) -> None:
        with self._lock:
            if self._subscribers and self._thread is None:
                self._start(after_fork=True)

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
