"""Engines shut down when the process exits, for hosts with no lifespan of their own
(WSGI servers: Flask, Django): one exit handler for every engine registered, which
keeps none of them alive."""

from __future__ import annotations

import atexit
import logging
import threading
import weakref

from statekit._engine import StateEngine

__all__ = ["shut_down_at_exit"]

logger = logging.getLogger("statekit")
_engines: weakref.WeakSet[StateEngine] = weakref.WeakSet()
_lock = threading.Lock()


def shut_down_at_exit(engine: StateEngine) -> None:
    """Shut ``engine`` down when the process exits (if it is still alive then; an
    engine shut down before does nothing again). A failing shutdown is logged and the
    other engines are still shut down."""
    with _lock:
        if not _engines:
            atexit.unregister(_shut_all)  # registered once, however many engines
            atexit.register(_shut_all)
        _engines.add(engine)


def _shut_all() -> None:
    with _lock:
        engines = list(_engines)
        _engines.clear()
    for engine in engines:
        try:
            engine.shutdown()
        except Exception:  # the process is ending: say so, and shut the others down
            logger.exception("statekit: shutting down %r at exit failed", engine)
