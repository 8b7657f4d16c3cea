"""Private ``redis-server`` processes on loopback, each in a folder of its own, and the
few Redis commands a topology asks of them (spoken over a socket: the test helpers do
not import redis-py, which stays an optional extra)."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "Node",
    "NodeError",
    "PortTaken",
    "Reply",
    "binary",
    "call",
    "free_ports",
    "info",
    "tails",
]

Reply = str | int | list["Reply"] | None

#: Ports are drawn from here: below the ephemeral range, so that a client's outgoing
#: connection does not take one meanwhile, and with room for a cluster node's bus port
#: (its port + 10000).
PORTS = range(20000, 30000)


class NodeError(RuntimeError):
    """A node did not start, or answered a command with an error."""


class PortTaken(NodeError):
    """A port chosen free was taken before the node could listen on it."""


def binary(name: str, package: str) -> str:
    """The path of program ``name``, or a clear error saying how to install it."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (on Debian: apt-get install -y {package})")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (and, with ``bus``, each port +
    10000 too, for a cluster node's bus)."""
    chosen: list[int] = []
    for _ in range(10_000):
        port = random.choice(PORTS)
        if port in chosen or (bus and port + 10000 in chosen):
            continue
        if _bindable(port) and (not bus or _bindable(port + 10000)):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise NodeError(f"found only {len(chosen)} of {count} free loopback ports")


def _read_reply(stream: BinaryIO) -> Reply:
    line = stream.readline()
    if not line:
        raise ConnectionError("the connection closed before the reply")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise NodeError(rest)
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if rest == "-1":
            return None
        data = stream.read(int(rest) + 2)
        return data[:-2].decode()
    if kind == b"*":
        return None if rest == "-1" else [_read_reply(stream) for _ in range(int(rest))]
    raise NodeError(f"unexpected reply {line!r}")


def call(port: int, *args: str | int, timeout: float = 1.0) -> Reply:
    """Send one command to the server on 127.0.0.1:``port`` and return its reply.

    Raises:
        OSError: the server cannot be reached (or did not answer in ``timeout``).
        NodeError: it answered with an error.
    """
    parts = [str(a).encode() for a in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def info(port: int, section: str, *, command: str = "INFO") -> dict[str, str]:
    """``INFO section`` (or ``CLUSTER INFO``) of a server, as a dict."""
    text = call(port, *command.split(), *([section] if section else []))
    assert isinstance(text, str)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line and line[0] != "#")


class Node:
    """One ``redis-server`` process on 127.0.0.1:``port``, with its folder (its data
    and its log), killed by its process id."""

    def __init__(self, program: str, port: int, args: list[str], *, label: str) -> None:
        self.program = program
        self.port = port
        self.args = args
        self.label = label
        self.folder = Path(tempfile.mkdtemp(prefix=f"statekit-{label.replace(' ', '-')}-"))
        self.log = self.folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The process id, while it runs."""
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.poll() is None

    def spawn(self, config: Path | None = None) -> None:
        """Start the process (without waiting for it to listen)."""
        head = [str(config)] if config is not None else []
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.program,
                    *head,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self.folder),
                    "--daemonize",
                    "no",
                    *self.args,
                ],
                stdin=subprocess.DEVNULL,
                # The log goes to standard output, so that a refused option (printed
                # before the log opens) is in the log too.
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_listening(self, deadline: float) -> None:
        """Wait until it answers ``PING``.

        Raises:
            PortTaken: its port was taken meanwhile.
            NodeError: it exited, or did not answer by ``deadline``.
        """
        while time.monotonic() < deadline:
            if not self.alive:
                tail = self.log_tail()
                if "Address already in use" in tail:
                    raise PortTaken(f"port {self.port} was taken")
                raise NodeError(f"the {self.label} on port {self.port} exited:\n{tail}")
            try:
                if call(self.port, "PING", timeout=0.2) == "PONG":
                    return
            except (OSError, NodeError):
                pass
            time.sleep(0.02)
        raise NodeError(
            f"the {self.label} on port {self.port} did not answer in time:\n{self.log_tail()}"
        )

    def kill(self) -> None:
        """SIGKILL the process (as a crash would) and wait for it to exit."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def remove(self) -> None:
        """Kill the process and delete its folder."""
        self.kill()
        self.process = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of its log, indented, headed by its label and port."""
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["(no log)"]
        return f"  -- {self.label} {self.port}:\n" + "\n".join(f"    {t}" for t in text)


def tails(nodes: list[Node]) -> str:
    """The log tails of several nodes, for an error message."""
    return "\n".join(node.log_tail() for node in nodes)
