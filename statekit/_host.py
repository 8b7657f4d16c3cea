"""What declarations, events and registries ask of the engine that made them.

:class:`Host` is the one internal interface between the engine and the objects it
hands out (states, registries, events): they hold a host and call only its methods,
never the engine's private parts. The engine implements it (``_engine.py``); this
module sits below the declarations so that they can name it without importing the
engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .stores.base import DeleteReason

if TYPE_CHECKING:
    from ._events import EventState
    from ._metrics import Meter
    from ._registry import SessionRegistry
    from ._states import GlobalState, SessionState, State
    from ._values import ValuePolicy

__all__ = ["Host"]

T = TypeVar("T")


class Host(Protocol):
    """The engine, as seen by its states, registries and events. Thread-safe."""

    #: The application's name.
    app: str
    #: How values become what the store keeps, and back (and change detection).
    values: ValuePolicy
    #: What the engine counts and measures; events note the sizes of what they write.
    meter: Meter

    # -- declarations ---------------------------------------------------------------

    def declare(self, state: State[Any]) -> None:
        """Record a new state (checking its name is free and its default storable)."""
        ...

    def declare_registry(
        self,
        registry: SessionRegistry[Any],
        *,
        ended: Callable[[str, DeleteReason], object],
        shutdown: Callable[[], object],
        resync: Callable[[], object],
    ) -> None:
        """Record a registry and the hooks it needs: a session ended (here or in another
        process), the engine shut down, notices may have been lost."""
        ...

    def listen(self) -> None:
        """Receive the store's notices from now on (remote listeners, ends elsewhere)."""
        ...

    # -- sessions --------------------------------------------------------------------

    def check_usable(self) -> None:
        """Raise :class:`~statekit.EngineClosed` once the engine was shut down."""
        ...

    def require_open(self, sid: str) -> None:
        """Touch ``sid``; raise SessionNotFound/SessionExpired unless it is open."""
        ...

    async def arequire_open(self, sid: str) -> None:
        """:meth:`require_open` without blocking the event loop."""
        ...

    def is_open(self, sid: str) -> bool:
        """Whether ``sid`` is open (not closed, not ended), without touching it."""
        ...

    # -- values ------------------------------------------------------------------------

    def read_value(self, state: State[T], stored: Any) -> tuple[T, Any, str | None]:
        """The stored value of ``state``, its stored form to write back (migrated, or
        read as the default) or None, and why it read as the default or None."""
        ...

    def check_writable(self, state: State[Any], stored: Any) -> None:
        """Raise CodecError if ``stored`` was written by a newer version of the app."""
        ...

    def open_value(self, state: State[T], stored: Any) -> T:
        """A private copy of a stored value, migrated if older, the default if it
        cannot be read (CodecError naming the state if the state is strict)."""
        ...

    def peek(self, sid: str, state: SessionState[T]) -> T:
        """A session's value read from outside an event (touching the session)."""
        ...

    def enter_user(self, ev: EventState) -> None:
        """Enter an event's session, then its user's record."""
        ...

    async def aenter_user(self, ev: EventState) -> None:
        """:meth:`enter_user` without blocking the event loop."""
        ...

    def leave_user(self, ev: EventState, failed: bool) -> None:
        """Leave an event of a user: its writes to the session and to the user commit
        together; then the user's record is given back."""
        ...

    async def aleave_user(self, ev: EventState, failed: bool) -> None:
        """:meth:`leave_user` without blocking the event loop."""
        ...

    def peek_user(self, user: str, state: SessionState[T]) -> T:
        """A user's value of a user state, read from outside an event."""
        ...

    async def apeek_user(self, user: str, state: SessionState[T]) -> T:
        """:meth:`peek_user` without blocking the event loop."""
        ...

    async def apeek(self, sid: str, state: SessionState[T]) -> T:
        """:meth:`peek` without blocking the event loop."""
        ...

    def global_get(self, state: GlobalState[T]) -> T:
        """A global's value (a copy)."""
        ...

    async def aglobal_get(self, state: GlobalState[T]) -> T:
        """:meth:`global_get` without blocking the event loop."""
        ...

    def global_update(self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any) -> T:
        """Replace a global's value with ``fn(current)``, or with ``new`` (fn None)."""
        ...

    async def aglobal_update(
        self, state: GlobalState[T], fn: Callable[[T], T] | None, new: Any
    ) -> T:
        """:meth:`global_update` without blocking the event loop."""
        ...

    def global_increment(self, state: GlobalState[T], n: int | float) -> T:
        """Add ``n`` to a numeric global, atomically."""
        ...

    async def aglobal_increment(self, state: GlobalState[T], n: int | float) -> T:
        """:meth:`global_increment` without blocking the event loop."""
        ...

    # -- events --------------------------------------------------------------------------

    def enter(self, ev: EventState) -> None:
        """Take the event's session (its lock, and on a shared store its lease) and
        load it into ``ev``."""
        ...

    async def aenter(self, ev: EventState) -> None:
        """:meth:`enter` without blocking the event loop."""
        ...

    def leave(self, ev: EventState, failed: bool) -> None:
        """Commit what the event changed (unless ``failed``), run listener rounds, give
        the session back."""
        ...

    async def aleave(self, ev: EventState, failed: bool) -> None:
        """:meth:`leave` without blocking the event loop."""
        ...

    def extend(self, ev: EventState) -> None:
        """Renew the open event's lease for another ``lease_ttl`` (LeaseLost if lost)."""
        ...

    async def aextend(self, ev: EventState) -> None:
        """:meth:`extend` without blocking the event loop."""
        ...
