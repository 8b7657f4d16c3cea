"""statekit: a framework-agnostic state engine.

Global state, per-session state and browser state for any Python web app, with
lifetimes, change detection and pluggable stores::

    from statekit import StateEngine

    engine = StateEngine()
    visitors = engine.global_state("visitors", 0)
    cart = engine.session_state("cart", [])

    sid = engine.open_session()
    visitors.increment()
    with engine.event(sid) as ev:
        ev[cart].append("milk")
"""

from ._changes import Change, changed, compare
from ._codec import Codec, CodecError, JSONCodec, SignedPickleCodec
from ._engine import StateEngine
from ._events import Event, EventResult, ListenerFailure
from ._registry import SessionRegistry
from ._states import GlobalState, SessionState, State
from .exceptions import (
    ChangeLoopError,
    EngineClosed,
    InvalidDeclaration,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    StateError,
    StateNotCopyable,
    StoreConflict,
    StoreUnavailable,
    UsageError,
    ValueNotStorable,
    WrongEngine,
)
from .stores import DeleteReason, MemoryStore, SQLiteStore, Store

__all__ = [
    "Change",
    "ChangeLoopError",
    "Codec",
    "CodecError",
    "DeleteReason",
    "EngineClosed",
    "Event",
    "EventResult",
    "GlobalState",
    "InvalidDeclaration",
    "JSONCodec",
    "ListenerFailure",
    "MemoryStore",
    "SQLiteStore",
    "SessionBusy",
    "SessionExpired",
    "SessionNotFound",
    "SessionNotInitialized",
    "SessionRegistry",
    "SessionState",
    "SignedPickleCodec",
    "State",
    "StateEngine",
    "StateError",
    "StateNotCopyable",
    "Store",
    "StoreConflict",
    "StoreUnavailable",
    "UsageError",
    "ValueNotStorable",
    "WrongEngine",
    "changed",
    "compare",
]

__version__ = "0.1.0"
