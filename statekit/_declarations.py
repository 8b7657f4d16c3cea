"""What an engine declares: its global, session, user and browser states and its registries
(the declaration methods of :class:`~statekit.StateEngine`, which inherits them).
Each makes the declaration object, which registers itself through the engine host."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from ._browser import DEFAULT_MAX_BYTES, BrowserKeys
from ._clock import Clock, wall
from ._engine_host import EngineHost
from ._registry import SessionRegistry
from ._states import MISSING, BrowserState, GlobalState, SessionState, UserState
from .stores.base import DeleteReason

if TYPE_CHECKING:
    from ._engine import StateEngine

__all__ = ["Declarations"]

T = TypeVar("T")


class Declarations:
    """The declaration methods of :class:`~statekit.StateEngine`."""

    _host: EngineHost

    @property
    def _engine(self) -> StateEngine:
        return cast("StateEngine", self)

    def global_state(
        self,
        name: str,
        default: T,
        *,
        version: int = 1,
        migrate: Callable[[int, Any], T] | None = None,
        strict: bool = False,
    ) -> GlobalState[T]:
        """Declare a value shared by every session. ``version``, ``migrate`` and
        ``strict`` are as for :meth:`session_state`.

        Raises:
            InvalidDeclaration: the name is invalid or already declared.
            StateNotCopyable: the default cannot be deep-copied.
        """
        return GlobalState(
            self._engine,
            self._host,
            name,
            default,
            version=version,
            migrate=migrate,
            strict=strict,
        )

    @overload
    def session_state(
        self,
        name: str,
        default: T,
        *,
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], T] | None = None,
        strict: bool = False,
    ) -> SessionState[T]: ...

    @overload
    def session_state(
        self,
        name: str,
        *,
        factory: Callable[[], T],
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], T] | None = None,
        strict: bool = False,
    ) -> SessionState[T]: ...

    def session_state(
        self,
        name: str,
        default: Any = MISSING,
        *,
        factory: Callable[[], Any] | None = None,
        ttl: float | None = None,
        on_delete: Callable[[Any, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], Any] | None = None,
        strict: bool = False,
    ) -> SessionState[Any]:
        """Declare a value of which each session has its own copy.

        Args:
            name: unique in this engine; the key under which stores keep the value.
            default: the initial value; each session gets a deep copy of it.
            factory: instead of ``default``, a zero-argument callable making the
                initial value (called once per session, on first read).
            ttl: seconds after its last write after which the value is deleted; the
                next read starts again from the default.
            on_delete: called as ``on_delete(value, reason)`` once per deleted value.
            version: the version of the values this code writes; raise it when their
                shape changes (a field renamed, a class moved). Values are stored with
                it; one stored by an older version is migrated when first read, and
                written back by the event that read it.
            migrate: with a version above 1, ``migrate(old_version, old_value)``
                returning the value now. ``old_value`` is the value as stored: with
                the default codec, dataclass and attrs instances come as
                :class:`~statekit.StoredObject` (class path and fields by name) and
                enum members as :class:`~statekit.StoredEnum`, whatever classes exist.
            strict: a stored value that cannot be read or migrated raises
                :class:`CodecError`; by default it reads as the default, the reason is
                logged and given in ``ev.result.value_problems``, and the event's
                commit replaces it. A value stored by a newer version always raises
                (it is left for the code that knows it).

        Raises:
            InvalidDeclaration: invalid name, duplicate name, both default and factory,
                or a ttl that is not a positive number.
            StateNotCopyable: the default cannot be deep-copied; objects such as locks
                belong in a per-session registry.
        """
        return SessionState(
            self._engine,
            self._host,
            name,
            default,
            factory=factory,
            ttl=ttl,
            on_delete=on_delete,
            version=version,
            migrate=migrate,
            strict=strict,
        )

    @overload
    def user_state(
        self,
        name: str,
        default: T,
        *,
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], T] | None = None,
        strict: bool = False,
    ) -> UserState[T]: ...

    @overload
    def user_state(
        self,
        name: str,
        *,
        factory: Callable[[], T],
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], T] | None = None,
        strict: bool = False,
    ) -> UserState[T]: ...

    def user_state(
        self,
        name: str,
        default: Any = MISSING,
        *,
        factory: Callable[[], Any] | None = None,
        ttl: float | None = None,
        on_delete: Callable[[Any, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Callable[[int, Any], Any] | None = None,
        strict: bool = False,
    ) -> UserState[Any]:
        """Declare a value of which each *user* has one copy, shared by all of the
        user's sessions on every device: a cart, preferences, a chat history.

        Events read and write it as session state, once opened with the id of the user
        the host authenticated: ``engine.event(sid, user=user_id)``. Such an event also
        takes the user's record, after its session (the lock order: a session, then
        its user), so that events of the user's sessions take turns on it, in every
        process; its writes to the session and to the user commit together, all or
        nothing. An event opened without ``user=`` cannot touch user state.

        The user's record expires after ``user_idle_ttl`` (an engine setting) without an
        event of that user; ``on_delete`` then runs once per value, in one process.

        Args are as :meth:`session_state`'s.

        Raises:
            InvalidDeclaration: as :meth:`session_state`; also on a store of your own
                that cannot commit a session and a user together (``joint_commits``).

        Example:
            ```python
            cart = engine.user_state("cart", [])
            with engine.event(sid, user=request_user_id) as ev:  # the host's login
                ev[cart].append("Milk")  # every session of the user sees it
            ```
        """
        return UserState(
            self._engine,
            self._host,
            name,
            default,
            factory=factory,
            ttl=ttl,
            on_delete=on_delete,
            version=version,
            migrate=migrate,
            strict=strict,
        )

    def browser_state(
        self,
        name: str,
        default: T,
        *,
        keys: BrowserKeys,
        storage_key: str | None = None,
        ttl: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Clock = wall,
    ) -> BrowserState[T]:
        """Declare a value kept in the browser (``localStorage``), as an opaque token.

        Args:
            name: unique in this engine.
            default: the value when the browser has none (or sends a bad token).
            keys: the secrets that make and read tokens, newest first; they never reach
                the browser.
            storage_key: the ``localStorage`` key (``name`` if omitted); tokens are bound
                to it.
            ttl: seconds a token stays valid after it is made; ``None``: no expiry.
            max_bytes: the largest token allowed.
            clock: the wall clock tokens are dated with (tokens cross processes).

        Raises:
            InvalidDeclaration: bad name, storage key, ttl or max_bytes, or no keys.
            ValueNotStorable: the default is not JSON-typed.
        """
        return BrowserState(
            self._engine,
            self._host,
            name,
            default,
            keys=keys,
            storage_key=storage_key,
            ttl=ttl,
            max_bytes=max_bytes,
            clock=clock,
        )

    @overload
    def registry(
        self,
        name: str,
        factory: Callable[[str], Coroutine[Any, Any, T]],
        cleanup: Callable[[T], object] | None = None,
    ) -> SessionRegistry[T]: ...

    @overload
    def registry(
        self,
        name: str,
        factory: Callable[[str], T],
        cleanup: Callable[[T], object] | None = None,
    ) -> SessionRegistry[T]: ...

    def registry(
        self,
        name: str,
        factory: Callable[[str], Any],
        cleanup: Callable[[Any], object] | None = None,
    ) -> SessionRegistry[Any]:
        """Declare a per-session registry, for objects that cannot be deep-copied or
        serialized (locks, connections, models). See :class:`SessionRegistry`.

        Args:
            name: unique among this engine's registries (1 to 128 of
                ``A-Z a-z 0-9 _ . : / -``).
            factory: ``factory(sid)`` makes a session's object; may be a coroutine
                function (open with ``await registry.aopen(sid)``).
            cleanup: ``cleanup(obj)`` runs exactly once per object when its session
                ends or the registry closes it; may be a coroutine function.

        With a shared store the engine starts receiving the store's notices, so that
        objects here are cleaned up when their session ends in another process.

        Raises:
            InvalidDeclaration: invalid or duplicate name, or a factory or cleanup that
                is not callable.
            EngineClosed: the engine was shut down.
        """
        return SessionRegistry(self._engine, self._host, name, factory, cleanup)
