"""Stores: where statekit keeps values.

``MemoryStore`` is the default. Every store implements the :class:`Store` protocol and
passes the same contract test suite.
"""

from .base import DeleteReason, Ended, Gone, Loaded, Store, StoreNamespace
from .memory import MemoryStore

__all__ = [
    "DeleteReason",
    "Ended",
    "Gone",
    "Loaded",
    "MemoryStore",
    "Store",
    "StoreNamespace",
]
