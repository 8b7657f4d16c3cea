"""State declarations: what a state is called, its default, lifetime and listeners.

A declaration belongs to one :class:`~statekit.StateEngine` and is made through it
(``engine.global_state(...)``, ``engine.session_state(...)``). It holds no values:
values live in the engine's store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._browser import DEFAULT_MAX_BYTES, BrowserKeys, DecodedToken
from ._checks import check_callable, check_name, check_seconds
from ._clock import Clock, wall
from ._codec import JSONCodec
from ._copying import Image, open_value, stored_form
from ._host import Host
from ._values import not_storable
from .exceptions import CodecError, InvalidDeclaration, StateNotCopyable
from .stores.base import DeleteReason

if TYPE_CHECKING:
    from ._engine import StateEngine
    from ._events import Event

__all__ = [
    "MISSING",
    "BrowserState",
    "GlobalState",
    "SessionState",
    "State",
    "UserState",
    "to_stored",
]

T = TypeVar("T")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


_READ_ONLY = frozenset(
    {
        "name",
        "engine",
        "listeners",
        "delete_callbacks",
        "remote_listeners",
        "ttl",
        "keys",
        "storage_key",
        "max_bytes",
        "version",
        "migrate",
        "strict",
    }
)

#: What a state's ``migrate`` is: ``migrate(old_version, old_value)`` -> the value now.
Migrate = Callable[[int, Any], Any]


def _is_set(obj: object, name: str) -> bool:
    try:
        object.__getattribute__(obj, name)
    except AttributeError:
        return False
    return True


def to_stored(name: str, value: Any, image: Image | None = None) -> Any:
    """The form in which ``value`` is stored (see :func:`statekit._copying.stored_form`).

    Raises:
        StateNotCopyable: naming the state, when the value cannot be deep-copied.
    """
    try:
        return stored_form(value, image)
    except Exception as exc:
        raise StateNotCopyable(name, type(value).__qualname__, exc) from exc


class State(Generic[T]):
    """What every state declaration has: a name, an engine and change listeners.

    Attributes:
        name: the state's name, unique in its engine.
        engine: the :class:`~statekit.StateEngine` it was declared on.
        listeners: its change listeners, in the order added (read-only; add with
            ``on_change``).
        version: the version of its values this code writes (1 unless declared).
        migrate: ``migrate(old_version, old_value)``, which makes a value of this
            version from one stored by an older one, or None.
        strict: whether a stored value that cannot be read (or migrated) raises
            :class:`~statekit.CodecError` rather than read as the default.

    Thread-safe: listeners may be added from any thread.
    """

    __slots__ = (
        "__weakref__",
        "_default",
        "_host",
        "_lock",
        "engine",
        "listeners",
        "migrate",
        "name",
        "strict",
        "version",
    )

    kind = "state"

    def __init__(self, engine: StateEngine, host: Host, name: str) -> None:
        self.name = check_name(name, f"{self.kind} state")
        self.engine = engine
        self._host = host
        self.listeners: tuple[Callable[..., object], ...] = ()
        self._lock = threading.Lock()
        self._default: Any = None  # the default's stored form, set by subclasses
        self.version = 1
        self.migrate: Migrate | None = None
        self.strict = False

    def _versioned(self, version: int, migrate: Migrate | None, strict: bool) -> None:
        """Check and set what the state's values carry across deploys."""
        what = f"{self.kind} state {self.name!r}"
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidDeclaration(
                f"version of {what} must be an int of 1 or more, got {version!r}"
            )
        if version > 1 and migrate is None:
            raise InvalidDeclaration(
                f"{what} has version {version}: give it migrate=, a function "
                "(old_version, old_value) -> value that reads values of older versions "
                "(to drop them instead, return the default from it)"
            )
        if migrate is not None:
            if version == 1:
                raise InvalidDeclaration(
                    f"{what} has migrate= but version 1: raise its version when its "
                    "values change shape"
                )
            check_callable(migrate, f"migrate of {what}", runs="as older values are read")
        if not isinstance(strict, bool):
            raise InvalidDeclaration(f"strict of {what} must be True or False, got {strict!r}")
        object.__setattr__(self, "version", version)  # (read-only once set)
        object.__setattr__(self, "migrate", migrate)
        object.__setattr__(self, "strict", strict)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, app={self._host.app!r})"

    def __setattr__(self, name: str, value: Any) -> None:
        # What a declaration is, once made, is read-only: its name, engine, lifetime,
        # keys, and the listeners it keeps (added through on_change and the like).
        if name in _READ_ONLY and _is_set(self, name):
            raise AttributeError(
                f"{name!r} of {self!r} is read-only: declare another state, or add "
                "listeners with on_change(), on_remote_change() or on_delete()"
            )
        object.__setattr__(self, name, value)

    @property
    def default(self) -> Any:
        """A copy of the declared default (``None`` for a session state made by a
        factory)."""
        return open_value(self._default)

    def _add_listener(self, fn: Callable[..., object], what: str = "on_change") -> None:
        check_callable(fn, f"{what}() of state {self.name!r}")
        with self._lock:
            object.__setattr__(self, "listeners", (*self.listeners, fn))


class GlobalState(State[T]):
    """One value per engine, shared by every session (and, with a shared store, every
    process).

    Declare with :meth:`StateEngine.global_state`. Every method is atomic on its own and
    thread-safe. Global writes are immediate: they are not part of an event's
    all-or-nothing commit. Values returned by :meth:`get` are copies, so mutating them
    changes nothing stored.

    Each method has an async twin (:meth:`aget`, :meth:`aset`, :meth:`aupdate`,
    :meth:`aincrement`) that gives the same results without blocking the event loop;
    listeners then run on the loop's thread.
    """

    __slots__ = ()

    kind = "global"

    def __init__(
        self,
        engine: StateEngine,
        host: Host,
        name: str,
        default: T,
        *,
        version: int = 1,
        migrate: Migrate | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(engine, host, name)
        self._default = to_stored(name, default)
        self._versioned(version, migrate, strict)
        host.declare(self)

    def get(self) -> T:
        """The current value (a copy), or a copy of the default if never written.

        Raises:
            CodecError: the stored value no longer opens (naming the state and why);
                :meth:`set` replaces it.
        """
        return self._host.global_get(self)

    async def aget(self) -> T:
        """:meth:`get` without blocking the event loop (same result, same errors)."""
        return await self._host.aglobal_get(self)

    def set(self, value: T) -> None:
        """Replace the value. Works even when the stored value no longer opens (its
        class was moved by a deploy, say): it is not read.

        Raises:
            StateNotCopyable: the value cannot be deep-copied.
            ValueNotStorable: the store's codec cannot encode the value (nothing is
                written).
        """
        self._host.global_update(self, None, value)

    async def aset(self, value: T) -> None:
        """:meth:`set` without blocking the event loop (same errors)."""
        await self._host.aglobal_update(self, None, value)

    def update(self, fn: Callable[[T], T]) -> T:
        """Atomically replace the value with ``fn(current)`` and return the new value.

        ``fn`` receives a private copy and may be called more than once when other
        threads or processes write at the same time, so it must not have side effects.
        No update is ever lost.

        Raises:
            CodecError: the stored value no longer opens (naming the state and why);
                :meth:`set` replaces it.
            ValueNotStorable: the store's codec cannot encode the new value (nothing is
                written).
        """
        return self._host.global_update(self, fn, None)

    async def aupdate(self, fn: Callable[[T], T]) -> T:
        """:meth:`update` without blocking the event loop (same result, same errors).
        ``fn`` is a plain function: it runs on the loop's thread, maybe more than
        once."""
        return await self._host.aglobal_update(self, fn, None)

    def increment(self, n: int | float = 1) -> T:
        """Atomically add ``n`` to a numeric value and return the new value.

        Raises:
            TypeError: the state's default or ``n`` is not a number.
        """
        return self._host.global_increment(self, n)

    async def aincrement(self, n: int | float = 1) -> T:
        """:meth:`increment` without blocking the event loop (same result, same
        errors)."""
        return await self._host.aglobal_increment(self, n)

    def on_change(self, fn: Callable[[T], object]) -> Callable[[T], object]:
        """Call ``fn(new_value)`` after each write that changes the value.

        Listeners run in the thread that wrote (for an async write, the event loop's),
        after the write, outside every lock; an exception is logged and does not undo
        the write. Usable as a decorator.
        """
        self._add_listener(fn)
        return fn


class SessionState(State[T]):
    """A value of which each session has its own copy.

    Declare with :meth:`StateEngine.session_state`. Each session gets a deep copy of
    the default (or a fresh result of the factory) the first time an event reads the
    state. Read and write inside events (``ev[state]``); :meth:`get` (or :meth:`aget`
    in async code) peeks from outside. Thread-safe.
    """

    __slots__ = ("_factory", "delete_callbacks", "remote_listeners", "ttl")

    kind = "session"

    def __init__(
        self,
        engine: StateEngine,
        host: Host,
        name: str,
        default: T = MISSING,
        *,
        factory: Callable[[], T] | None = None,
        ttl: float | None = None,
        on_delete: Callable[[T, DeleteReason], object] | None = None,
        version: int = 1,
        migrate: Migrate | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(engine, host, name)
        self._versioned(version, migrate, strict)
        if factory is not None and default is not MISSING:
            raise InvalidDeclaration(
                f"session state {name!r} takes a default or a factory, not both"
            )
        if factory is not None and not callable(factory):
            raise InvalidDeclaration(
                f"factory of session state {name!r} must be a zero-argument callable, "
                f"got {type(factory).__name__}"
            )
        self._factory = factory
        self._default = to_stored(name, None if default is MISSING else default)
        self.ttl = None if ttl is None else check_seconds(ttl, f"ttl of session state {name!r}")
        self.delete_callbacks: tuple[Callable[[T, DeleteReason], object], ...] = ()
        self.remote_listeners: tuple[Callable[[str, T], object], ...] = ()
        if on_delete is not None:
            self.on_delete(on_delete)
        host.declare(self)

    def new_value(self) -> T:
        """A fresh initial value: a deep copy of the default, or the factory's result."""
        if self._factory is not None:
            return self._factory()
        value: T = open_value(self._default)
        return value

    def get(self, sid: str) -> T:
        """Peek at a session's value from outside an event (a copy; the default if the
        session has no value yet). Counts as activity for the session's idle timer.

        Raises:
            SessionNotFound: unknown id.
            SessionExpired: the session has ended.
            SessionCorrupt: the store holds damaged data for the session.
            CodecError: the stored value no longer opens (naming the state and why);
                assigning a new value in an event replaces it.
        """
        return self._host.peek(sid, self)

    async def aget(self, sid: str) -> T:
        """:meth:`get` without blocking the event loop (same result, same errors).
        Deletion callbacks of what the read found expired run on the loop's thread."""
        return await self._host.apeek(sid, self)

    def on_change(self, fn: Callable[[Event, T], object]) -> Callable[[Event, T], object]:
        """Call ``fn(ev, value)`` after an event changes this state in a session.

        ``ev`` is a new event of the same session: the listener may read and write
        states and emit outputs through it, and its writes may trigger further
        listeners. A listener that raises is logged and listed in the event's result;
        its own writes are discarded and the committed event stands. Usable as a
        decorator.
        """
        self._add_listener(fn)
        return fn

    def on_remote_change(self, fn: Callable[[str, T], object]) -> Callable[[str, T], object]:
        """Call ``fn(sid, value)`` when *another* engine on the same shared store and app
        (typically another worker process) commits a change to this state.

        For pushing updates to a client connected to this process: the change itself,
        and its :meth:`on_change` listeners, ran where it was made. Runs in the store's
        notification thread, outside every lock, within about a second of the commit
        (best effort: after a lost connection, listeners fire for every session this
        engine used whose version moved). An exception is logged. Usable as a decorator.
        """
        check_callable(fn, f"on_remote_change() of state {self.name!r}", runs="in a notice thread")
        with self._lock:
            object.__setattr__(self, "remote_listeners", (*self.remote_listeners, fn))
        self._host.listen()
        return fn

    def on_delete(
        self, fn: Callable[[T, DeleteReason], object]
    ) -> Callable[[T, DeleteReason], object]:
        """Call ``fn(value, reason)`` exactly once when a stored value of this state is
        deleted (session idle, closed grace over, evicted, ttl, engine shutdown).

        Runs outside every lock; an exception is logged and never stops other callbacks
        or reaping. Usable as a decorator.
        """
        check_callable(fn, f"on_delete() of state {self.name!r}", runs="as values are deleted")
        with self._lock:
            object.__setattr__(self, "delete_callbacks", (*self.delete_callbacks, fn))
        return fn


class UserState(SessionState[T]):
    """A value of which each user has one copy, shared by all of the user's sessions
    (every tab, every device).

    Declare with :meth:`StateEngine.user_state`. An event opened with the id of the
    user the host authenticated (``engine.event(sid, user=...)``) reads and writes it
    as ``ev[state]``; its writes commit together with the session's own, all or
    nothing, and events of the user's sessions take turns on it. :meth:`get` peeks at a
    user's value from outside an event. Thread-safe.

    The user's values live in a record of their own, which expires after the engine's
    ``user_idle_ttl`` without an event of the user (``on_delete`` callbacks then run
    once, with reason ``idle``).
    """

    __slots__ = ()

    kind = "user"

    def get(self, user: str) -> T:
        """Peek at a user's value from outside an event (a copy; the default if the
        user has no value yet, or no record). Counts as activity for the user's record.

        Raises:
            UsageError: ``user`` is not a user id (a non-empty str).
            SessionCorrupt, CodecError: as :meth:`SessionState.get`.
        """
        return self._host.peek_user(user, self)

    async def aget(self, user: str) -> T:
        """:meth:`get` without blocking the event loop."""
        return await self._host.apeek_user(user, self)

    def on_remote_change(self, fn: Callable[[str, T], object]) -> Callable[[str, T], object]:
        """Call ``fn(sid, value)`` for each session of the user that this engine served
        lately, when another session of the user commits a change to this state (in
        this process, or in another engine on the same shared store): for pushing the
        new value to the user's other tabs. Runs in the notification thread (or, for a
        change made here, the thread of the event that made it, after its commit),
        outside every lock; an exception is logged. Usable as a decorator.
        """
        return super().on_remote_change(fn)


_JSON = JSONCodec()


class BrowserState(State[T]):
    """A value that lives in the browser, under a ``localStorage`` key.

    Declare with :meth:`StateEngine.browser_state`. The server only ever sees a token
    (:mod:`statekit._browser`): the host passes the tokens the page sent to
    ``engine.event(sid, browser=...)``, reads and writes the value like a session state
    (``ev[state]``), and sends back the tokens of ``ev.result.browser``. A missing,
    tampered, expired or foreign token reads as the default, and the reason is in
    ``ev.result.browser_problems``. Values are JSON-typed (tagged JSON: tuples, sets,
    dates... keep their type). Change listeners work as for session states.
    Thread-safe.
    """

    __slots__ = ("_clock", "_context", "keys", "max_bytes", "storage_key", "ttl")

    kind = "browser"

    def __init__(
        self,
        engine: StateEngine,
        host: Host,
        name: str,
        default: T,
        *,
        keys: BrowserKeys,
        storage_key: str | None = None,
        ttl: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Clock = wall,
    ) -> None:
        super().__init__(engine, host, name)
        if not isinstance(keys, BrowserKeys):
            raise InvalidDeclaration(
                f"browser state {name!r} needs keys=BrowserKeys([secret, ...]) (or "
                f"BrowserKeys.ephemeral() for development), got {type(keys).__name__}"
            )
        self.keys = keys
        self.storage_key = check_name(storage_key or name, "storage key")
        # What a token is bound to: this app, this state, this localStorage key.
        self._context = f"{host.app}/{name}/{self.storage_key}"
        self.ttl = None if ttl is None else check_seconds(ttl, f"ttl of browser state {name!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 64:
            raise InvalidDeclaration(f"max_bytes must be an int of at least 64, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._clock = clock
        self._default = to_stored(name, default)
        self.canonical(default)  # a default that cannot live in the browser fails now
        host.declare(self)

    def new_value(self) -> T:
        """A fresh copy of the default."""
        value: T = open_value(self._default)
        return value

    def canonical(self, value: Any) -> bytes:
        """The value's JSON encoding, which change detection compares.

        Raises:
            ValueNotStorable: the value is not JSON-typed.
        """
        try:
            return _JSON.encode(value)
        except CodecError as exc:
            raise not_storable(self.name, "the browser", exc) from exc

    def encode(self, value: T, *, bind: str = "") -> str:
        """The token for ``value``, for the browser to keep.

        ``bind`` ties the token to a value of the host's (a user id, say): it then reads
        only with the same ``bind``.

        Raises:
            ValueNotStorable: the value is not JSON-typed.
            TokenTooLarge: the token would exceed ``max_bytes``.
        """
        self.canonical(value)
        return self.keys.encode(
            value,
            storage_key=self._context,
            now=self._clock(),
            ttl=self.ttl,
            bind=bind,
            state=self.name,
            max_bytes=self.max_bytes,
        )

    def decode(self, token: object, *, bind: str = "") -> DecodedToken:
        """Read a token the browser sent. Never raises: on any problem the value is a
        copy of the default and ``problem`` says why (``reencode`` asks for a new token
        after a key rotation)."""
        decoded = self.keys.decode(
            token,
            storage_key=self._context,
            now=self._clock(),
            bind=bind,
            max_bytes=self.max_bytes,
        )
        if decoded.problem is not None:
            return DecodedToken(
                value=self.new_value(), problem=decoded.problem, issued_at=decoded.issued_at
            )
        return decoded

    def on_change(self, fn: Callable[[Event, T], object]) -> Callable[[Event, T], object]:
        """Call ``fn(ev, value)`` after an event changes this value; as
        :meth:`SessionState.on_change`. Usable as a decorator."""
        self._add_listener(fn)
        return fn
