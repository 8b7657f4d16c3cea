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

from ._browser import BrowserKeys, DecodedToken, TokenProblem
from ._changes import Change, changed, compare
from ._codec import Codec, JSONCodec, SignedPickleCodec, StoredEnum, StoredObject
from ._engine import StateEngine
from ._events import Event, EventResult, ListenerFailure
from ._metrics import EngineStats, Timings, ValueSize
from ._registry import SessionRegistry
from ._states import BrowserState, GlobalState, SessionState, State, UserState
from ._watch import StateChange, Watch
from .exceptions import (
    ChangeLoopError,
    CodecError,
    EngineClosed,
    InvalidDeclaration,
    LeaseLost,
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    StateError,
    StateNotCopyable,
    StoreConflict,
    StoreUnavailable,
    TokenTooLarge,
    UsageError,
    ValueNotStorable,
    WrongEngine,
)
from .stores import DeleteReason, MemoryStore, SQLiteStore, Store

__all__ = [
    "BrowserKeys",
    "BrowserState",
    "Change",
    "ChangeLoopError",
    "Codec",
    "CodecError",
    "DecodedToken",
    "DeleteReason",
    "EngineClosed",
    "EngineStats",
    "Event",
    "EventResult",
    "GlobalState",
    "InvalidDeclaration",
    "JSONCodec",
    "LeaseLost",
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
    "StateChange",
    "StateEngine",
    "StateError",
    "StateNotCopyable",
    "Store",
    "StoreConflict",
    "StoreUnavailable",
    "StoredEnum",
    "StoredObject",
    "Timings",
    "TokenProblem",
    "TokenTooLarge",
    "UsageError",
    "UserState",
    "ValueNotStorable",
    "ValueSize",
    "Watch",
    "WrongEngine",
    "changed",
    "compare",
]

__version__ = "0.1.0"
