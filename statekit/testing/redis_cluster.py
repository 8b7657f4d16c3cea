"""A real Redis Cluster on loopback ports, for tests of code that runs on one."""

from __future__ import annotations

import subprocess
import time
from types import TracebackType

import attrs
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

__all__ = ["ClusterNodeView", "RedisCluster"]

HOST = "127.0.0.1"
SLOTS = 16384


@attrs.frozen(kw_only=True)
class ClusterNodeView:
    """One line of ``CLUSTER NODES``: a node as another node sees it."""

    id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[str, ...]

    @property
    def failing(self) -> bool:
        """Seen as down (``fail`` or ``fail?``) or without an address."""
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})

    @classmethod
    def parse(cls, line: str) -> ClusterNodeView:
        fields = line.split()
        address = fields[1].split("@")[0]
        return cls(
            id=fields[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            slots=tuple(fields[8:]),
        )


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, every node
    a ``redis-server --cluster-enabled yes`` on a free port of 127.0.0.1, in a folder of
    its own, keeping nothing on disk::

        with RedisCluster() as cluster:  # 3 masters, 3 replicas
            client = redis.cluster.RedisCluster.from_url(cluster.url)
            ...
            port = cluster.masters()[0]
            cluster.kill(port)  # SIGKILL, as a crash
            cluster.wait_for_failover(port)  # its replica now serves its slots
            cluster.restore()  # the killed node back, as a replica

    :meth:`start` (or ``with``) returns once every slot is served, every node says
    ``cluster_state:ok`` and every replica is in sync with its master. A node is
    declared failed after ``node_timeout`` seconds without an answer (Redis's
    ``cluster-node-timeout``; short, so that a failover takes a few seconds), and a
    replica always stands for election, however old its data
    (``cluster-replica-validity-factor 0``).

    Not thread-safe: drive one cluster from one thread.

    Raises:
        ValueError: fewer than 3 masters, or a negative number of replicas.
        RuntimeError: ``redis-server`` or ``redis-cli`` is not installed, or the cluster
            did not come up within ``start_timeout`` seconds (the message ends with the
            tail of each node's log).
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout: float = 1.0,
        start_timeout: float = 30.0,
    ) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, not {masters}")
        if node_timeout <= 0:
            raise ValueError(f"node_timeout is in seconds, above 0, not {node_timeout}")
        if replicas < 0:
            raise ValueError(f"replicas is a count of replicas per master, not {replicas}")
        self.server = binary("redis-server", "redis-server")
        self.cli = binary("redis-cli", "redis-tools")
        self.master_count = masters
        self.replica_count = replicas
        self.node_timeout = node_timeout
        self.start_timeout = start_timeout
        self.nodes: dict[int, Node] = {}
        self._killed: dict[int, tuple[str, tuple[str, ...]]] = {}

    # -- starting and stopping --------------------------------------------------------

    def start(self) -> Self:
        """Start the nodes, make them a cluster and wait until it serves every slot.

        A port taken between its choice and its use is chosen anew (three times)."""
        if self.nodes:
            raise RuntimeError("this cluster is started already")
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
        ports = free_ports(self.master_count * (1 + self.replica_count), bus=True)
        args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(int(self.node_timeout * 1000)),
            "--cluster-replica-validity-factor",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--repl-diskless-sync-delay",
            "0",
        ]
        for port in ports:
            self.nodes[port] = Node(self.server, port, args, label="cluster node")
            self.nodes[port].spawn()
        for node in self.nodes.values():
            node.wait_listening(deadline)
        try:
            created = subprocess.run(
                [
                    self.cli,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{port}" for port in ports),
                    "--cluster-replicas",
                    str(self.replica_count),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(self._failure("redis-cli --cluster create did not finish")) from exc
        if created.returncode != 0:
            output = (created.stdout + created.stderr).strip().splitlines()[-10:]
            raise RuntimeError(
                self._failure("redis-cli --cluster create failed:\n" + "\n".join(output))
            )
        self._wait_whole(deadline, "the cluster did not come up")

    def stop(self) -> None:
        """Kill every node by its process id and delete their folders."""
        for node in self.nodes.values():
            node.remove()
        self.nodes.clear()
        self._killed.clear()

    def __enter__(self) -> Self:
        return self if self.nodes else self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what it looks like -----------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, for a cluster client's ``startup_nodes``."""
        return [(HOST, port) for port in self.nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` of a running master (a cluster client finds
        the other nodes from it)."""
        return f"redis://{HOST}:{self.masters()[0]}"

    def pids(self) -> list[int]:
        """The process ids of the running nodes."""
        return [node.pid for node in self.nodes.values() if node.pid is not None]

    def view(self) -> list[ClusterNodeView]:
        """``CLUSTER NODES`` as a running node sees it."""
        for node in self.nodes.values():
            if node.alive:
                try:
                    text = call(node.port, "CLUSTER", "NODES")
                except (OSError, NodeError):
                    continue
                assert isinstance(text, str)
                return [ClusterNodeView.parse(line) for line in text.splitlines() if line]
        raise RuntimeError("no node of the cluster is running")

    def masters(self) -> list[int]:
        """The ports of the running masters that serve slots, as the cluster sees
        them now."""
        return sorted(
            v.port
            for v in self.view()
            if "master" in v.flags and v.slots and not v.failing and self._alive(v.port)
        )

    def replicas(self) -> list[int]:
        """The ports of the running replicas."""
        return sorted(
            v.port
            for v in self.view()
            if "slave" in v.flags and not v.failing and self._alive(v.port)
        )

    def _alive(self, port: int) -> bool:
        return port in self.nodes and self.nodes[port].alive

    # -- failures ---------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL the node on ``port``, as a crash would (its folder stays, for
        :meth:`restore`)."""
        if not self._alive(port):
            raise ValueError(f"no running node of this cluster listens on port {port}")
        me = next(v for v in self.view() if v.port == port)
        self._killed[port] = (me.id, me.slots if "master" in me.flags else ())
        self.nodes[port].kill()

    def wait_for_failover(self, killed_port: int, timeout: float = 30.0) -> int:
        """Wait until a replica of the killed master on ``killed_port`` is master of its
        slots and the cluster is whole again (every slot served, every running node
        ``cluster_state:ok``); return the new master's port.

        Raises:
            ValueError: ``killed_port`` is not a master this cluster killed.
            TimeoutError: no replica took over within ``timeout`` seconds.
        """
        killed_id, slots = self._killed.get(killed_port, ("", ()))
        if not slots:
            raise ValueError(
                f"port {killed_port} is not a master killed with kill(): nothing fails over"
            )
        deadline = time.monotonic() + timeout
        self._wait_whole(deadline, f"no replica took over from {killed_port}", TimeoutError)
        for v in self.view():
            if v.slots == slots and v.id != killed_id and self._alive(v.port):
                return v.port
        raise TimeoutError(self._failure(f"the slots of {killed_port} went to no running node"))

    def restore(self, timeout: float = 30.0) -> None:
        """Start the killed nodes again (each rejoins, a master whose slots were taken
        over as a replica of its successor) and wait until the cluster is whole."""
        deadline = time.monotonic() + timeout
        for port in list(self._killed):
            self.nodes[port].spawn()
            self.nodes[port].wait_listening(deadline)
        self._killed.clear()
        self._wait_whole(deadline, "the restarted nodes did not rejoin", TimeoutError)

    # -- waiting ------------------------------------------------------------------------

    def _whole(self) -> bool:
        """Every running node says the cluster is ok, serves every slot, sees every
        running node (and no other) up, in the role and with the master it says it
        has; every running replica is in sync with its master."""
        running = [node.port for node in self.nodes.values() if node.alive]
        seen: dict[int, list[ClusterNodeView]] = {}
        for port in running:
            state = info(port, "", command="CLUSTER INFO")
            if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != str(SLOTS):
                return False
            text = call(port, "CLUSTER", "NODES")
            assert isinstance(text, str)
            seen[port] = [ClusterNodeView.parse(line) for line in text.splitlines() if line]
            me = next(v for v in seen[port] if "myself" in v.flags)
            if "slave" in me.flags and info(port, "replication").get("master_link_status") != "up":
                return False
        roles = {
            v.port: ("master" in v.flags, v.master_id, v.slots)
            for views in seen.values()
            for v in views
            if "myself" in v.flags
        }
        for views in seen.values():
            up = {
                v.port: ("master" in v.flags, v.master_id, v.slots) for v in views if not v.failing
            }
            if up != roles:
                return False
        masters = [port for port, (master, _, slots) in roles.items() if master and slots]
        return len(masters) == self.master_count

    def _wait_whole(
        self, deadline: float, what: str, error: type[Exception] = RuntimeError
    ) -> None:
        while True:
            try:
                if self._whole():
                    return
            except (OSError, NodeError):
                pass
            if time.monotonic() > deadline:
                raise error(self._failure(what))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        nodes = list(self.nodes.values())
        return f"{what}; the nodes' logs end with:\n{tails(nodes)}"
