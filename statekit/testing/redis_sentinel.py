"""A real Redis Sentinel set-up on loopback ports: a master, its replica and three
sentinels, for tests of code that follows a failover."""

from __future__ import annotations

import time
from types import TracebackType

from typing_extensions import Self

from statekit.testing._nodes import (
    Node,
    NodeError,
    PortTaken,
    binary,
    call,
    free_ports,
    info,
    tails,
)

__all__ = ["RedisSentinel"]

HOST = "127.0.0.1"
DATA = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]


class RedisSentinel:
    """A master and ``replicas`` replicas (``redis-server``, keeping nothing on disk)
    watched by ``sentinels`` sentinels (``redis-sentinel``) that agree on a failure
    with ``quorum`` votes, every process on a free port of 127.0.0.1::

        with RedisSentinel() as setup:
            sentinel = redis.sentinel.Sentinel(setup.sentinels, socket_timeout=1)
            client = sentinel.master_for(setup.service_name, socket_timeout=1)
            ...
            setup.kill_master()  # SIGKILL, as a crash
            setup.wait_for_failover()  # the sentinels promoted the replica
            setup.restore()  # the old master back, as a replica of the new one

    :meth:`start` (or ``with``) returns once the replicas are in sync and every
    sentinel knows the master, its replicas and the other sentinels. The sentinels
    declare the master down after ``down_after`` seconds without an answer
    (``down-after-milliseconds``) and give a failover ``failover_timeout`` seconds
    (``failover-timeout``; also how long a sentinel waits before trying again).

    Not thread-safe: drive one set-up from one thread.

    Raises:
        ValueError: a count that cannot make a set-up (no replica, a quorum larger
            than the sentinels, ...).
        RuntimeError: ``redis-server`` or ``redis-sentinel`` is not installed, or the
            set-up did not come up within ``start_timeout`` seconds (the message ends
            with the tail of each process's log).
    """

    def __init__(
        self,
        *,
        service_name: str = "statekit",
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after: float = 1.0,
        failover_timeout: float = 2.0,
        start_timeout: float = 30.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"a failover needs at least 1 replica, not {replicas}")
        if not 1 <= quorum <= sentinels:
            raise ValueError(f"quorum must be from 1 to sentinels ({sentinels}), not {quorum}")
        if not service_name or any(c.isspace() for c in service_name):
            raise ValueError(f"service_name must be a word, not {service_name!r}")
        self.server = binary("redis-server", "redis-server")
        self.sentinel_program = binary("redis-sentinel", "redis-sentinel")
        self.service_name = service_name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout
        self.start_timeout = start_timeout
        self.servers: dict[int, Node] = {}
        self.sentinel_nodes: dict[int, Node] = {}
        self._killed: list[int] = []

    # -- starting and stopping --------------------------------------------------------

    def start(self) -> Self:
        """Start the servers and the sentinels, and wait until the sentinels watch
        them. A port taken between its choice and its use is chosen anew (three
        times)."""
        if self.servers:
            raise RuntimeError("this set-up is started already")
        for attempt in range(3):
            try:
                self._start(time.monotonic() + self.start_timeout)
                return self
            except PortTaken:
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self, deadline: float) -> None:
        ports = free_ports(1 + self.replica_count + self.sentinel_count)
        master, replicas = ports[0], ports[1 : 1 + self.replica_count]
        self.servers[master] = Node(self.server, master, DATA, label="master")
        for port in replicas:
            args = [*DATA, "--replicaof", HOST, str(master)]
            self.servers[port] = Node(self.server, port, args, label="replica")
        for node in self.servers.values():
            node.spawn()
        for node in self.servers.values():
            node.wait_listening(deadline)
        # The sentinels start once the replicas are in sync: a sentinel reads a
        # replica's state at once, then every 10 s only.
        self._wait(deadline, "the replicas did not sync", RuntimeError, master)
        for port in ports[1 + self.replica_count :]:
            node = Node(self.sentinel_program, port, [], label="sentinel")
            config = node.folder / "sentinel.conf"  # a sentinel rewrites its own
            name = self.service_name
            config.write_text(
                f"sentinel monitor {name} {HOST} {master} {self.quorum}\n"
                f"sentinel down-after-milliseconds {name} {int(self.down_after * 1000)}\n"
                f"sentinel failover-timeout {name} {int(self.failover_timeout * 1000)}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
            self.sentinel_nodes[port] = node
            node.spawn(config)
        for node in self.sentinel_nodes.values():
            node.wait_listening(deadline)
        self._wait(deadline, "the set-up did not come up", RuntimeError)

    def stop(self) -> None:
        """Kill every process by its process id and delete their folders."""
        for node in [*self.sentinel_nodes.values(), *self.servers.values()]:
            node.remove()
        self.servers.clear()
        self.sentinel_nodes.clear()
        self._killed.clear()

    def __enter__(self) -> Self:
        return self if self.servers else self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what it looks like -----------------------------------------------------------

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel, for ``redis.sentinel.Sentinel``."""
        return [(HOST, port) for port in self.sentinel_nodes]

    def master(self) -> tuple[str, int]:
        """(host, port) of the master, as the first sentinel that answers says."""
        for port in self.sentinel_nodes:
            try:
                return self._master_by(port)
            except (OSError, NodeError):
                continue
        raise RuntimeError("no sentinel answers")

    def pids(self) -> list[int]:
        """The process ids of the running servers and sentinels."""
        nodes = [*self.servers.values(), *self.sentinel_nodes.values()]
        return [node.pid for node in nodes if node.pid is not None]

    def _master_by(self, sentinel: int) -> tuple[str, int]:
        reply = call(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
        if not isinstance(reply, list) or len(reply) != 2:
            raise NodeError(f"sentinel {sentinel} knows no master {self.service_name}")
        return str(reply[0]), int(str(reply[1]))

    # -- failures ---------------------------------------------------------------------

    def kill_master(self) -> int:
        """SIGKILL the master, as a crash would; return its port."""
        port = self.master()[1]
        self.servers[port].kill()
        self._killed.append(port)
        return port

    def wait_for_failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every sentinel names a running server as master, other than the
        ones killed, and that server says it is master; return its (host, port).

        Raises:
            TimeoutError: no replica was promoted within ``timeout`` seconds.
        """
        if not self._killed:
            raise ValueError("no master was killed: call kill_master() first")
        self._wait(time.monotonic() + timeout, "no replica was promoted", TimeoutError)
        return self.master()

    def restore(self, timeout: float = 30.0) -> None:
        """Start the killed servers again as replicas of the current master (once the
        sentinels elected one) and wait until they are in sync and the sentinels see
        them."""
        deadline = time.monotonic() + timeout
        if not self._killed:
            return
        master = self.wait_for_failover(deadline - time.monotonic())[1]
        for port in self._killed:
            node = self.servers[port]
            node.args = [*DATA, "--replicaof", HOST, str(master)]
            node.spawn()
            node.wait_listening(deadline)
        self._killed.clear()
        self._wait(deadline, "the restarted servers did not rejoin", TimeoutError)

    # -- waiting ------------------------------------------------------------------------

    def _whole(self, master: int | None) -> bool:
        """Every running replica is in sync with the master; and, unless ``master`` is
        given (before the sentinels start), every sentinel names one running master
        that says so, knows the other sentinels and sees each running replica."""
        sentinels = master is None
        if master is None:
            masters = {self._master_by(port) for port in self.sentinel_nodes}
            if len(masters) != 1:
                return False
            master = masters.pop()[1]
        if master in self._killed or info(master, "replication").get("role") != "master":
            return False
        replicas = {p for p, node in self.servers.items() if node.alive and p != master}
        for port in replicas:
            state = info(port, "replication")
            if state.get("master_port") != str(master) or state.get("master_link_status") != "up":
                return False
        if not sentinels:
            return True
        for port in self.sentinel_nodes:
            reply = call(port, "SENTINEL", "MASTER", self.service_name)
            assert isinstance(reply, list)
            fields = dict(zip(reply[::2], reply[1::2], strict=True))
            if fields.get("flags") != "master" or fields.get("num-other-sentinels") != str(
                self.sentinel_count - 1
            ):
                return False
            seen = call(port, "SENTINEL", "REPLICAS", self.service_name)
            assert isinstance(seen, list)
            up = set()
            for entry in seen:
                assert isinstance(entry, list)
                row = dict(zip(entry[::2], entry[1::2], strict=True))
                if row.get("flags") == "slave":
                    up.add(int(str(row.get("port"))))
            if not replicas <= up:
                return False
        return True

    def _wait(
        self, deadline: float, what: str, error: type[Exception], master: int | None = None
    ) -> None:
        while True:
            try:
                if self._whole(master):
                    return
            except (OSError, NodeError):
                pass
            if time.monotonic() > deadline:
                nodes = [*self.servers.values(), *self.sentinel_nodes.values()]
                raise error(f"{what}; the logs end with:\n{tails(nodes)}")
            time.sleep(0.05)
