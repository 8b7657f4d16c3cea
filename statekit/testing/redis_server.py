"""A private ``redis-server`` process on loopback, for tests and benchmarks."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from typing_extensions import Self

__all__ = ["RedisServer"]


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
