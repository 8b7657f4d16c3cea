"""Stores: where statekit keeps values.

``MemoryStore`` (the default, one process), ``SQLiteStore`` (durable, the processes of
one host) and ``RedisStore`` (many processes and hosts; needs the ``redis`` extra and is
imported only when used). Every store implements the :class:`Store` protocol and
passes the same contract test suite.
"""

from typing import TYPE_CHECKING, Any

from .base import (
    Busy,
    CommitPart,
    DeleteReason,
    Ended,
    Gone,
    Lease,
    Loaded,
    Notice,
    SessionIdTaken,
    Store,
    StoreNamespace,
)
from .memory import MemoryStore
from .sqlite import SQLiteStore

if TYPE_CHECKING:
    from .redis import RedisStore


def __getattr__(name: str) -> Any:
    if name == "RedisStore":  # imported on first use: it needs the redis package
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'statekit.stores' has no attribute {name!r}")


__all__ = [
    "Busy",
    "CommitPart",
    "DeleteReason",
    "Ended",
    "Gone",
    "Lease",
    "Loaded",
    "MemoryStore",
    "Notice",
    "RedisStore",
    "SQLiteStore",
    "SessionIdTaken",
    "Store",
    "StoreNamespace",
]
