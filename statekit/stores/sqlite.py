"""The SQLite store: durable on one host, shared by its processes.

Standard library only (:mod:`sqlite3`), in WAL mode so that readers never wait for the
writer. Every operation is one transaction; those that write take the write lock at
once (``BEGIN IMMEDIATE``), so concurrent processes are serialized by SQLite itself —
which also makes every claim (reaping, eviction, leases) happen exactly once. Commits
of events are synced to disk (``synchronous=FULL``); touches and leases, which only
move deadlines, are not (a crash forgets at most the last few touches).

Each thread of each process gets its own connection; a forked child opens new ones
and names itself anew in the notices it writes; a fork waits for the write transactions
in flight (a child forked inside one would never write). Notices for other processes
go to a table that subscribers poll.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from statekit import _fork
from statekit._codec import Codec, JSONCodec, encode_with
from statekit.exceptions import (
    SessionExpired,
    SessionNotFound,
    StoreConflict,
    StoreUnavailable,
)

from ._notices import NoticeFeed
from ._sqlite_file import SCHEMA, file_path, identity, to_wal
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
    refuse_keep,
)

__all__ = ["SQLiteStore"]

#: How long notices and tombstones are kept, in seconds of the engine's clock.
NOTICE_HORIZON = 120.0
TOMBSTONE_HORIZON = 86_400.0


class SQLiteStore:
    """Keeps state in an SQLite database file, shared by the processes of one host.

    Args:
        path: the database file (created if missing, with its folder's permissions).
        codec: how values become bytes; :class:`~statekit.JSONCodec` by default.
        timeout: seconds to wait for another process's write before giving up with
            :class:`~statekit.StoreUnavailable`.
        poll_interval: seconds between two looks for other processes' notices, while
            some engine listens for them.

    Thread-safe and process-safe (``ValueError`` for ``":memory:"``, which would be one
    empty database per thread: use :class:`~statekit.MemoryStore`). Do not put the
    file on a network file system: SQLite's locking is not reliable there.
    """

    shared = True
    keeps_leases = False
    joint_commits = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        codec: Codec | None = None,
        timeout: float = 10.0,
        poll_interval: float = 0.1,
    ) -> None:
        for name, seconds in (("timeout", timeout), ("poll_interval", poll_interval)):
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise ValueError(f"{name} must be a number of seconds, got {seconds!r}")
            if not 0 < seconds <= 3600:  # (nan too)
                raise ValueError(f"{name} must be above 0 and at most 3600 s, got {seconds}")
        self.path = file_path(path)
        self.codec: Codec = JSONCodec() if codec is None else codec
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._file: tuple[int, int] | None = None  # (device, inode), once it has the tables
        self._absolute = os.path.abspath(self.path)
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._closed = False
        self._writes = _fork.ForkGate(f"a write of {self._label()}")
        try:
            with self._writes:  # the tables (and WAL mode), written once
                self._connection().executescript(SCHEMA)
            self._file = identity(self._absolute)
        except StoreUnavailable:
            raise  # said already (it is an OSError too)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(self._label(), str(exc)) from exc

    def __repr__(self) -> str:
        return self._label()

    def _label(self) -> str:
        return f"SQLiteStore({Path(self.path).name!r})"

    def namespace(self, app: str) -> _SQLiteNamespace:
        """A handle on application ``app`` in this database."""
        return _SQLiteNamespace(self, app)

    # -- connections ------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        held: _Connection | None = getattr(self._local, "conn", None)
        if held is not None and held.pid == os.getpid():
            return held.db
        try:
            # Once the schema is there, only that file: a missing one is an error, not a
            # new empty database beside the one other processes use.
            where = self.path if self._file is None else Path(self._absolute).as_uri() + "?mode=rw"
            db = sqlite3.connect(
                where,
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=self._file is not None,
            )
            to_wal(db, self.timeout)
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise StoreUnavailable(self._label(), str(exc)) from exc
        held = _Connection(db)
        self._local.conn = held
        self._connections.add(held)
        return db

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); rolled back if the body raises.

        Raises:
            StoreUnavailable: the database cannot be opened, locked, or written.
        """
        if self._closed:
            raise StoreUnavailable(self._label(), "the store was shut down")
        db = self._connection()
        with self._writes:
            try:
                self._same_file()
                if durable:
                    db.execute("PRAGMA synchronous=FULL")
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(self._label(), str(exc)) from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreUnavailable(self._label(), str(exc)) from exc
                raise
            finally:
                if durable:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("PRAGMA synchronous=NORMAL")

    def read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        """Run one query outside a write transaction."""
        if self._closed:
            raise StoreUnavailable(self._label(), "the store was shut down")
        try:
            self._same_file()
            return self._connection().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailable(self._label(), str(exc)) from exc

    def _same_file(self) -> None:
        """Raise when the database file was removed or replaced (see ``_connection``)."""
        if identity(self._absolute) != self._file:
            raise sqlite3.OperationalError(
                f"the database file {self.path} was removed or replaced; restore it, or "
                "restart the processes that use it"
            )

    def close(self) -> None:
        """Close every connection this store opened. The store cannot be used after."""
        self._closed = True
        with self._writes:  # the last connection to close checkpoints the log
            for held in [held for held in self._connections if held.pid == os.getpid()]:
                with contextlib.suppress(sqlite3.Error):
                    held.db.close()


class _Connection:
    __slots__ = ("__weakref__", "db", "pid")

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.pid = os.getpid()


_VICTIM = (
    "SELECT sid, closed, deadline FROM sk_sessions WHERE app=? {} "
    "ORDER BY closed DESC, touched LIMIT 1"
)
_SESSION_ROW = "SELECT version, closed, deadline, lease, lease_until FROM sk_sessions "


class _SQLiteNamespace:
    """One application's state in an :class:`SQLiteStore`. Thread-safe."""

    def __init__(self, store: SQLiteStore, app: str) -> None:
        self._store = store
        self._app = app
        self.origin = f"sqlite-{uuid.uuid4().hex[:12]}"
        self._feed = NoticeFeed(f"statekit-sqlite-notices-{app}", self._poll)
        _fork.after_fork_in_child(self)

    def _after_fork(self) -> None:
        """A child of a fork is a handle of its own (see the module's docstring)."""
        self.origin = f"sqlite-{uuid.uuid4().hex[:12]}"

    # -- helpers (inside a transaction) ------------------------------------------

    def _row(self, db: sqlite3.Connection, sid: str) -> Any:
        return db.execute(_SESSION_ROW + "WHERE app=? AND sid=?", (self._app, sid)).fetchone()

    def _gone(self, db: sqlite3.Connection, sid: str) -> Gone | None:
        row = db.execute(
            "SELECT reason, at FROM sk_gone WHERE app=? AND sid=?", (self._app, sid)
        ).fetchone()
        return None if row is None else Gone(reason=DeleteReason(row[0]), at=row[1])

    def _notice(
        self,
        db: sqlite3.Connection,
        kind: str,
        sid: str,
        now: float,
        names: tuple[str, ...] = (),
        reason: DeleteReason | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO sk_notices (app, origin, kind, sid, names, reason, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                self._app,
                self.origin,
                kind,
                sid,
                "\n".join(names),
                None if reason is None else reason.value,
                now,
            ),
        )

    def _claim_session(
        self,
        db: sqlite3.Connection,
        sid: str,
        closed: bool,
        reason: DeleteReason,
        at: float,
        now: float,
    ) -> Ended:
        values = dict(
            db.execute(
                "SELECT name, value FROM sk_values WHERE app=? AND sid=?", (self._app, sid)
            ).fetchall()
        )
        db.execute("DELETE FROM sk_values WHERE app=? AND sid=?", (self._app, sid))
        db.execute("DELETE FROM sk_sessions WHERE app=? AND sid=?", (self._app, sid))
        db.execute("UPDATE sk_counts SET sessions = sessions - 1 WHERE app=?", (self._app,))
        db.execute(
            "INSERT OR REPLACE INTO sk_gone (app, sid, reason, at) VALUES (?, ?, ?, ?)",
            (self._app, sid, reason.value, at),
        )
        if not closed:
            self._notice(db, "ended", sid, now, reason=reason)
        return Ended(sid=sid, reason=reason, values=values, was_closed=closed, at=at)

    def _claim_value(
        self, db: sqlite3.Connection, sid: str, name: str, value: bytes, at: float
    ) -> Ended:
        db.execute(
            "DELETE FROM sk_values WHERE app=? AND sid=? AND name=?", (self._app, sid, name)
        )
        return Ended(sid=sid, reason=DeleteReason.TTL, values={name: value}, state=name, at=at)

    # -- sessions ---------------------------------------------------------------

    def create_session(
        self, sid: str, *, now: float, deadline: float, capacity: int
    ) -> tuple[Ended, ...]:
        evicted: list[Ended] = []
        with self._store.transaction() as db:
            row = db.execute("SELECT sessions FROM sk_counts WHERE app=?", (self._app,)).fetchone()
            count = 0 if row is None else row[0]
            if row is None:
                db.execute("INSERT INTO sk_counts (app, sessions) VALUES (?, 0)", (self._app,))
            while count >= capacity:
                # The least recently used that no event holds, if there is one.
                victim = (
                    db.execute(
                        _VICTIM.format("AND (lease_until IS NULL OR lease_until <= ?)"),
                        (self._app, now),
                    ).fetchone()
                    or db.execute(_VICTIM.format(""), (self._app,)).fetchone()
                )
                if victim is None:
                    break
                victim_sid, closed, victim_deadline = victim
                if victim_deadline <= now:
                    reason = DeleteReason.CLOSED if closed else DeleteReason.IDLE
                    at = victim_deadline
                else:
                    reason, at = DeleteReason.EVICTED, now
                evicted.append(self._claim_session(db, victim_sid, bool(closed), reason, at, now))
                count -= 1
            try:
                db.execute(
                    "INSERT INTO sk_sessions (app, sid, deadline, touched) VALUES (?, ?, ?, ?)",
                    (self._app, sid, deadline, now),
                )
            except sqlite3.IntegrityError:
                raise SessionIdTaken from None
            db.execute("UPDATE sk_counts SET sessions = sessions + 1 WHERE app=?", (self._app,))
        return tuple(evicted)

    def load_session(
        self, sid: str, *, now: float, touch_until: float | None, lease: Lease | None = None
    ) -> Loaded | Gone | Busy | None:
        with self._store.transaction() as db:
            row = self._row(db, sid)
            if row is None:
                return self._gone(db, sid)
            version, closed, deadline, held, held_until = row
            if deadline <= now:
                reason = DeleteReason.CLOSED if closed else DeleteReason.IDLE
                ended = self._claim_session(db, sid, bool(closed), reason, deadline, now)
                return Gone(reason=reason, at=deadline, ended=ended)
            if lease is not None:
                if held is not None and held != lease.token and held_until > now:
                    return Busy(until=held_until)
                db.execute(
                    "UPDATE sk_sessions SET lease=?, lease_until=? WHERE app=? AND sid=?",
                    (lease.token, lease.until, self._app, sid),
                )
            expired = tuple(
                self._claim_value(db, sid, name, value, at)
                for name, value, at in db.execute(
                    "SELECT name, value, deadline FROM sk_values "
                    "WHERE app=? AND sid=? AND deadline <= ?",
                    (self._app, sid, now),
                ).fetchall()
            )
            if not closed and touch_until is not None:
                db.execute(
                    "UPDATE sk_sessions SET deadline=?, touched=? WHERE app=? AND sid=?",
                    (touch_until, now, self._app, sid),
                )
            values = dict(
                db.execute(
                    "SELECT name, value FROM sk_values WHERE app=? AND sid=?", (self._app, sid)
                ).fetchall()
            )
        return Loaded(
            sid=sid, version=version, closed=bool(closed), values=values, expired=expired
        )

    def peek(
        self, sid: str, name: str, *, now: float, touch_until: float | None
    ) -> Loaded | Gone | None:
        outcome = self.load_session(sid, now=now, touch_until=touch_until)
        assert not isinstance(outcome, Busy)
        return outcome

    def commit(
        self,
        sid: str,
        *,
        version: int,
        writes: Mapping[str, Any],
        ttl_deadlines: Mapping[str, float],
        now: float,
        lease: str | None = None,
        release: bool = True,
        keep: object = None,
    ) -> int:
        refuse_keep(keep, self)
        part = CommitPart(
            sid=sid,
            version=version,
            writes=writes,
            ttl_deadlines=ttl_deadlines,
            lease=lease,
            release=release,
        )
        with self._store.transaction(durable=True) as db:
            return self._commit_in(db, part, now)

    def commit_joint(self, parts: Iterable[CommitPart], *, now: float) -> tuple[int, ...]:
        # One transaction: a part refused rolls back the parts written before it.
        with self._store.transaction(durable=True) as db:
            return tuple(self._commit_in(db, part, now, joint=True) for part in parts)

    def _commit_in(
        self, db: sqlite3.Connection, part: CommitPart, now: float, *, joint: bool = False
    ) -> int:
        """Inside a transaction: check and write one commit; the new version."""
        sid, version, lease = part.sid, part.version, part.lease
        row = self._row(db, sid)
        if row is None:
            gone = self._gone(db, sid)
            if gone is None:
                raise SessionNotFound(sid)
            raise SessionExpired(sid, gone.reason.value, max(0.0, now - gone.at))
        found, _closed, _deadline, held, _until = row
        if found != version:
            raise StoreConflict(sid, version, found)
        if lease is not None and held != lease:
            raise StoreConflict(sid, version, found)
        if joint and not part.writes:  # a part that only gives its lease back
            if lease is not None and part.release:
                db.execute(
                    "UPDATE sk_sessions SET lease=NULL, lease_until=NULL WHERE app=? AND sid=?",
                    (self._app, sid),
                )
            return version
        db.executemany(
            "INSERT OR REPLACE INTO sk_values (app, sid, name, value, deadline) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (self._app, sid, name, value, part.ttl_deadlines.get(name))
                for name, value in part.writes.items()
            ],
        )
        if lease is not None and part.release:
            db.execute(
                "UPDATE sk_sessions SET version=?, lease=NULL, lease_until=NULL "
                "WHERE app=? AND sid=?",
                (version + 1, self._app, sid),
            )
        else:
            db.execute(
                "UPDATE sk_sessions SET version=? WHERE app=? AND sid=?",
                (version + 1, self._app, sid),
            )
        self._notice(db, "changed", sid, now, names=tuple(part.writes))
        return version + 1

    def release(self, sid: str, *, lease: str) -> None:
        with self._store.transaction() as db:
            db.execute(
                "UPDATE sk_sessions SET lease=NULL, lease_until=NULL "
                "WHERE app=? AND sid=? AND lease=?",
                (self._app, sid, lease),
            )

    def renew(self, sid: str, *, lease: str, until: float) -> bool:
        with self._store.transaction() as db:
            renewed = db.execute(
                "UPDATE sk_sessions SET lease_until=? WHERE app=? AND sid=? AND lease=?",
                (until, self._app, sid, lease),
            )
            return renewed.rowcount == 1

    def close_session(self, sid: str, *, now: float, deadline: float) -> bool | Gone | None:
        with self._store.transaction() as db:
            row = self._row(db, sid)
            if row is None:
                return self._gone(db, sid)
            _version, closed, old_deadline, _held, _until = row
            if closed:
                return False
            if old_deadline <= now:
                ended = self._claim_session(db, sid, False, DeleteReason.IDLE, old_deadline, now)
                return Gone(reason=DeleteReason.IDLE, at=old_deadline, ended=ended)
            db.execute(
                "UPDATE sk_sessions SET closed=1, deadline=?, touched=? WHERE app=? AND sid=?",
                (deadline, now, self._app, sid),
            )
            self._notice(db, "ended", sid, now, reason=DeleteReason.CLOSED)
        return True

    def session_count(self) -> int:
        rows = self._store.read("SELECT sessions FROM sk_counts WHERE app=?", (self._app,))
        return int(rows[0][0]) if rows else 0

    # -- lifetimes ---------------------------------------------------------------

    def reap(self, *, now: float, limit: int) -> tuple[Ended, ...]:
        # A cheap look first: most calls find nothing due and need no write lock.
        due_sessions = self._store.read(
            "SELECT 1 FROM sk_sessions WHERE app=? AND deadline <= ? LIMIT 1", (self._app, now)
        )
        due_values = self._store.read(
            "SELECT 1 FROM sk_values WHERE app=? AND deadline <= ? LIMIT 1", (self._app, now)
        )
        if not due_sessions and not due_values:
            return ()
        out: list[Ended] = []
        with self._store.transaction() as db:
            sessions = db.execute(
                "SELECT deadline, sid, closed FROM sk_sessions "
                "WHERE app=? AND deadline <= ? ORDER BY deadline LIMIT ?",
                (self._app, now, limit),
            ).fetchall()
            values = db.execute(
                "SELECT deadline, sid, name, value FROM sk_values "
                "WHERE app=? AND deadline <= ? ORDER BY deadline LIMIT ?",
                (self._app, now, limit),
            ).fetchall()
            claimed: set[str] = set()
            # (deadline, 0 for a session / 1 for a value, sid, closed or name, value)
            due: list[tuple[float, int, str, Any, Any]] = sorted(
                [(d, 0, sid, closed, None) for d, sid, closed in sessions]
                + [(d, 1, sid, name, value) for d, sid, name, value in values],
                key=lambda item: (item[0], item[1]),
            )
            for deadline, kind, sid, detail, value in due[:limit]:
                if kind == 0:
                    reason = DeleteReason.CLOSED if detail else DeleteReason.IDLE
                    out.append(self._claim_session(db, sid, bool(detail), reason, deadline, now))
                    claimed.add(sid)
                elif sid not in claimed:
                    out.append(self._claim_value(db, sid, detail, value, deadline))
            db.execute(
                "DELETE FROM sk_notices WHERE app=? AND at < ?", (self._app, now - NOTICE_HORIZON)
            )
            db.execute(  # global writes' notices are stamped with the wall clock
                "DELETE FROM sk_notices WHERE app=? AND kind='global' AND at < ?",
                (self._app, time.time() - NOTICE_HORIZON),
            )
            db.execute(
                "DELETE FROM sk_gone WHERE app=? AND at < ?", (self._app, now - TOMBSTONE_HORIZON)
            )
        return tuple(out)

    # -- globals -----------------------------------------------------------------

    def global_get(self, name: str) -> tuple[Any, int] | None:
        rows = self._store.read(
            "SELECT value, version FROM sk_globals WHERE app=? AND name=?", (self._app, name)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def global_cas(self, name: str, *, version: int | None, value: Any) -> int | None:
        with self._store.transaction(durable=True) as db:
            row = db.execute(
                "SELECT version FROM sk_globals WHERE app=? AND name=?", (self._app, name)
            ).fetchone()
            found = None if row is None else row[0]
            if found != version:
                return None
            new_version = 1 if found is None else found + 1
            db.execute(
                "INSERT OR REPLACE INTO sk_globals (app, name, value, version) "
                "VALUES (?, ?, ?, ?)",
                (self._app, name, value, new_version),
            )
            self._notice(db, "global", "", time.time(), names=(name,))
        return new_version

    def global_add(self, name: str, amount: int | float, *, default: int | float) -> Any:
        codec = self._store.codec
        with self._store.transaction(durable=True) as db:
            row = db.execute(
                "SELECT value, version FROM sk_globals WHERE app=? AND name=?", (self._app, name)
            ).fetchone()
            current, version = (default, 0) if row is None else (codec.decode(row[0]), row[1])
            value = current + amount
            db.execute(
                "INSERT OR REPLACE INTO sk_globals (app, name, value, version) "
                "VALUES (?, ?, ?, ?)",
                (self._app, name, encode_with(codec, value), version + 1),
            )
            self._notice(db, "global", "", time.time(), names=(name,))
        return value

    # -- notices -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[Notice], None]) -> Callable[[], None]:
        return self._feed.subscribe(callback)

    def _poll(
        self,
        stop: threading.Event,
        ready: threading.Event,
        deliver: Callable[[Notice], None],
    ) -> None:
        """Read new notices every ``poll_interval``; ``resync`` after a gap (a first
        read that fails counts as one: the loop goes on, and starts from there)."""
        last = "SELECT COALESCE(MAX(seq), 0) FROM sk_notices WHERE app=?"
        cursor: int | None = None
        try:
            cursor, lost = int(self._store.read(last, (self._app,))[0][0]), False
        except Exception:
            lost = True
        ready.set()
        last_ok = time.monotonic()
        while not stop.wait(self._store.poll_interval):
            try:
                if cursor is None:  # from now on (what came before: a resync)
                    cursor, rows = int(self._store.read(last, (self._app,))[0][0]), []
                else:
                    rows = self._store.read(
                        "SELECT seq, origin, kind, sid, names, reason FROM sk_notices "
                        "WHERE app=? AND seq > ? ORDER BY seq",
                        (self._app, cursor),
                    )
            except Exception:
                lost = True
                continue
            if time.monotonic() - last_ok > NOTICE_HORIZON / 2:
                lost = True  # this thread was stalled long enough to miss trimmed notices
            last_ok = time.monotonic()
            if lost:
                deliver(Notice(kind="resync", sid="", origin="sqlite"))
                lost = False
            for seq, origin, kind, sid, names, reason in rows:
                cursor = seq
                if origin == self.origin:
                    continue
                deliver(
                    Notice(
                        kind=kind,
                        sid=sid,
                        names=tuple(names.split("\n")) if names else (),
                        reason=None if reason is None else DeleteReason(reason),
                        origin=origin,
                    )
                )

    def shutdown(self) -> tuple[Ended, ...]:
        self._feed.stop()
        return ()
