"""The SQLite store's database file: the path it may be (a file, not in memory), its
tables, how the store knows the file, and its switch to WAL."""

from __future__ import annotations

import os
import sqlite3
import time

__all__ = ["SCHEMA", "file_path", "identity", "to_wal"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sk_sessions (
    app TEXT NOT NULL, sid TEXT NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    closed INTEGER NOT NULL DEFAULT 0,
    deadline REAL NOT NULL,
    touched REAL NOT NULL,
    lease TEXT, lease_until REAL,
    PRIMARY KEY (app, sid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sk_sessions_deadline ON sk_sessions (app, deadline);
CREATE INDEX IF NOT EXISTS sk_sessions_lru ON sk_sessions (app, closed DESC, touched);
CREATE TABLE IF NOT EXISTS sk_values (
    app TEXT NOT NULL, sid TEXT NOT NULL, name TEXT NOT NULL,
    value BLOB NOT NULL, deadline REAL,
    PRIMARY KEY (app, sid, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sk_values_deadline ON sk_values (app, deadline)
    WHERE deadline IS NOT NULL;
CREATE TABLE IF NOT EXISTS sk_counts (app TEXT PRIMARY KEY, sessions INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sk_gone (
    app TEXT NOT NULL, sid TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (app, sid)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS sk_gone_at ON sk_gone (app, at);
CREATE TABLE IF NOT EXISTS sk_globals (
    app TEXT NOT NULL, name TEXT NOT NULL, value BLOB NOT NULL, version INTEGER NOT NULL,
    PRIMARY KEY (app, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sk_notices (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL, origin TEXT NOT NULL, kind TEXT NOT NULL, sid TEXT NOT NULL,
    names TEXT NOT NULL DEFAULT '', reason TEXT, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sk_notices_app ON sk_notices (app, seq);
"""


def identity(path: str) -> tuple[int, int] | None:
    """The file's (device, inode), or None when it is not there."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def to_wal(db: sqlite3.Connection, timeout: float) -> None:
    """Put the file in WAL mode, if it is not yet. The switch takes a lock that
    SQLite's busy wait does not cover: it fails at once while another connection
    writes, or while several processes open a new file together, so it is asked again,
    with growing pauses, for up to ``timeout`` seconds (as a busy write would wait).

    Raises:
        sqlite3.OperationalError: still locked after ``timeout``, or any other error.
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    try:
        while True:
            left = deadline - time.monotonic()
            # SQLite's own wait (reading the mode) within what is left, not a whole
            # timeout each time round.
            db.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")
            try:
                if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                left = deadline - time.monotonic()
                if "locked" not in str(exc) or left <= 0:
                    raise
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
    finally:
        db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")


def file_path(path: str | os.PathLike[str]) -> str:
    """The database's path, which must name a file: every thread (and process) of the
    store opens it. An in-memory database would be one empty database per thread.

    Raises:
        ValueError: ``path`` is ``":memory:"`` or an in-memory URI.
    """
    text = os.fspath(path)
    if text == ":memory:" or (text.startswith("file:") and "mode=memory" in text):
        raise ValueError(
            f"SQLiteStore needs a database file every thread and process opens; {text!r} "
            "would give each thread an empty database of its own: use MemoryStore() for "
            "state kept in this process, or a file path"
        )
    return text
