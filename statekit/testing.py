"""Test helpers shipped with statekit.

:class:`FakeClock` replaces the engine's clock so that lifetimes can be tested
without sleeping, and :func:`checked_store` makes a memory store that refuses what a
shared store would::

    clock = FakeClock()
    engine = StateEngine(checked_store(), clock=clock, idle_ttl=60)
    sid = engine.open_session()
    clock.advance(61)
    engine.reap()  # the session is gone, its callbacks ran
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from typing_extensions import Self

from statekit._codec import Codec, JSONCodec
from statekit.stores.memory import MemoryStore

__all__ = ["FakeClock", "RedisServer", "checked_store"]


def checked_store(codec: Codec | None = None) -> MemoryStore:
    """A :class:`~statekit.MemoryStore` that checks every value written with ``codec``
    (:class:`~statekit.JSONCodec`, the shared stores' default, if omitted).

    Tests of a logic layer run fast on the memory store, while the app runs on SQLite
    or Redis in production; with this store, a value that production's codec could not
    write (an object JSON cannot carry, a str with a lone surrogate, an int too long to
    write as text) raises :class:`~statekit.ValueNotStorable` in the tests already.
    """
    return MemoryStore(check_values=JSONCodec() if codec is None else codec)


class FakeClock:
    """A clock that only moves when told to.

    Call the instance to read it. Thread-safe.

    Args:
        start: the initial reading, in seconds.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` and return the new reading.

        Raises:
            ValueError: if ``seconds`` is negative (clocks used for lifetimes never
                go back).
        """
        if seconds < 0:
            raise ValueError(
                f"FakeClock.advance() needs a non-negative number of seconds, "
                f"got {seconds!r}; a lifetime clock never goes back"
            )
        with self._lock:
            self._now += seconds
            return self._now


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` process on 127.0.0.1, for tests and benchmarks.

    It listens on a free port (or ``port``), keeps nothing on disk unless ``persist``
    (then every write goes to an fsynced append-only file in :attr:`folder`, so that
    :meth:`stop` then :meth:`start` restarts it with its data), and is stopped by its
    process id::

        server = RedisServer().start()
        store = RedisStore(server.url)
        ...
        server.stop()

    Raises:
        RuntimeError: ``redis-server`` is not installed, or did not start in 10 s.
    """

    def __init__(self, port: int | None = None, *, persist: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed (on Debian: apt-get install -y redis-server)"
            )
        self.binary = binary
        self.port = port or _free_port()
        self.persist = persist
        self.folder = Path(tempfile.mkdtemp(prefix="statekit-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's ``redis://`` URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Self:
        """Start the server and wait until it answers ``PING``."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes" if self.persist else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        """Kill the server (as a crash would) and wait for it to exit."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None
