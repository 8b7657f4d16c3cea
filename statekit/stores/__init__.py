"""Stores: where statekit keeps values.

``MemoryStore`` is the default. Every store implements the :class:`Store` protocol and
passes the same contract test suite.
"""

from .base import (
    Busy,
    DeleteReason,
    Ended,
    Gone,
    Lease,
    Loaded,
    Notice,
    Store,
    StoreNamespace,
)
from .memory import MemoryStore

__all__ = [
    "Busy",
    "DeleteReason",
    "Ended",
    "Gone",
    "Lease",
    "Loaded",
    "MemoryStore",
    "Notice",
    "Store",
    "StoreNamespace",
]
