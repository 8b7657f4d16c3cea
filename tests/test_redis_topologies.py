"""statekit.testing.RedisCluster and RedisSentinel: the real local topologies users test
their apps against, as a redis-py client relies on them (sharding, failover, stopping).

The ``redis_cluster`` and ``redis_sentinel`` fixtures are shared by the whole run: each
test writes keys of its own prefix, and a test that kills a node restores it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import redis
import redis.cluster
import redis.sentinel

from statekit.testing import RedisCluster, RedisSentinel
from statekit.testing._nodes import free_ports

T = TypeVar("T")

#: How long a client may take to write again after a failover (a bound, not a timing).
RECOVERY = 30.0


def until_it_works(call: Callable[[], T]) -> T:
    """``call()`` again until it does not raise a Redis error, for at most RECOVERY s."""
    deadline = time.monotonic() + RECOVERY
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def keys_on(port: int, prefix: str) -> int:
    with redis.Redis(port=port) as node:
        return sum(1 for _ in node.scan_iter(match=f"{prefix}*", count=1000))


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


def cluster_client(cluster: RedisCluster) -> redis.cluster.RedisCluster:
    """A redis-py cluster client that knows every node of ``cluster``."""
    nodes = [
        redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
        for host, port in cluster.startup_nodes
    ]
    return redis.cluster.RedisCluster(startup_nodes=nodes)


def port_of(client: redis.cluster.RedisCluster, key: str) -> int:
    """The port of the master that holds ``key``, as the client sees it now."""
    return int(client.get_node_from_key(key).port)  # type: ignore[no-untyped-call]


def redis_children() -> set[int]:
    """The process ids of this process's running redis-* children (Linux)."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        state, ppid = rest.split()[:2]
        if name.startswith("redis") and int(ppid) == os.getpid() and state != "Z":
            found.add(int(entry.name))
    return found


def test_a_cluster_spreads_keys_over_its_three_masters(redis_cluster: RedisCluster) -> None:
    """3,000 keys written through a cluster client land on all three masters, about a
    third each. Fails if the slots were not spread (one master holding them all) or
    the client could not find the nodes from the helper's URL."""
    prefix = f"spread-{uuid.uuid4().hex[:8]}:"
    client = redis.cluster.RedisCluster.from_url(redis_cluster.url)
    try:
        pipe = client.pipeline()  # type: ignore[no-untyped-call]
        for i in range(3000):
            pipe.set(f"{prefix}{i}", i)
        pipe.execute()
    finally:
        client.close()
    masters = redis_cluster.masters()
    counts = [keys_on(port, prefix) for port in masters]
    assert len(masters) == 3
    assert len(redis_cluster.replicas()) == 3
    assert sum(counts) == 3000
    assert all(800 <= n <= 1200 for n in counts), counts


def test_a_cluster_survives_a_master_killed(redis_cluster: RedisCluster) -> None:
    """SIGKILL the master of a key: its replica is promoted, the value (replicated
    before the kill) is still there and writes work again, through the same client.
    Fails if no replica takes over, or the client cannot write again in RECOVERY s."""
    key = f"failover-{uuid.uuid4().hex[:8]}"
    client = cluster_client(redis_cluster)
    try:
        victim = port_of(client, key)
        with redis.Redis(port=victim) as master:
            pipe = master.pipeline(transaction=False)
            pipe.set(key, "before").wait(1, 5000)
            assert pipe.execute() == [True, 1]  # on its replica too
        replicas_before = set(redis_cluster.replicas())
        redis_cluster.kill(victim)
        try:
            assert until_it_works(lambda: client.get(key)) == b"before"
            until_it_works(lambda: client.set(key, "after"))
            promoted = redis_cluster.wait_for_failover(victim)
            assert promoted in replicas_before
            assert victim not in redis_cluster.masters()
            assert promoted in redis_cluster.masters()
            assert port_of(client, key) == promoted
            assert client.get(key) == b"after"
        finally:
            redis_cluster.restore()
        assert len(redis_cluster.masters()) == 3
        assert victim in redis_cluster.replicas()  # back, as the new master's replica
    finally:
        client.close()


def test_a_cluster_stops_every_process_it_started() -> None:
    """After ``with RedisCluster(...)``, no node's process runs and no port answers.
    Fails if a node outlives the block (a leaked process)."""
    before = redis_children()
    with RedisCluster(masters=3, replicas=0) as cluster:
        pids = cluster.pids()
        ports = [port for _, port in cluster.startup_nodes]
        assert redis_children() - before == set(pids)
        assert len(pids) == 3
        with redis.Redis(port=ports[0]) as node:
            assert node.ping()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert redis_children() == before
    assert all(refuses(port) for port in ports)


def test_sentinel_clients_follow_a_failover(redis_sentinel: RedisSentinel) -> None:
    """A ``redis.sentinel`` client writes, the master is SIGKILLed, the sentinels
    promote the replica and the same client writes again, on the new master, and reads
    what was replicated before the kill. Fails if no new master is elected, or the
    client does not find it within RECOVERY s."""
    key = f"sentinel-{uuid.uuid4().hex[:8]}"
    name = redis_sentinel.service_name
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        redis_sentinel.sentinels, socket_timeout=1.0
    )
    client = sentinel.master_for(name, socket_timeout=1.0)  # type: ignore[no-untyped-call]
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set(key, "before").wait(1, 5000)
        assert pipe.execute() == [True, 1]
        old = redis_sentinel.kill_master()
        try:
            until_it_works(lambda: client.set(f"{key}:after", "after"))
            host, new = redis_sentinel.wait_for_failover()
            assert new != old
            found = sentinel.discover_master(name)  # type: ignore[no-untyped-call]
            assert found == (host, new)
            assert client.get(key) == b"before"
        finally:
            redis_sentinel.restore()
        with redis.Redis(port=old) as restarted:
            assert restarted.info("replication")["role"] == "slave"
    finally:
        client.close()
        for conn in sentinel.sentinels:
            conn.close()


def test_a_sentinel_set_up_stops_every_process_it_started() -> None:
    """After ``with RedisSentinel()``, neither server nor sentinel runs. Fails if a
    process outlives the block."""
    before = redis_children()
    with RedisSentinel() as setup:
        pids = setup.pids()
        ports = [port for _, port in setup.sentinels] + [setup.master()[1]]
        assert redis_children() - before == set(pids)
        assert len(pids) == 5  # master, replica, 3 sentinels
    assert redis_children() == before
    assert all(refuses(port) for port in ports)


def test_missing_programs_fail_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without the programs, the helpers raise (a test using them fails rather than
    skips) and name the package to install."""
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"redis-server is not installed .*apt-get"):
        RedisCluster()
    (tmp_path / "redis-server").symlink_to("/bin/true")
    with pytest.raises(RuntimeError, match=r"redis-cli is not installed .*redis-tools"):
        RedisCluster()
    with pytest.raises(RuntimeError, match=r"redis-sentinel is not installed .*redis-sentinel"):
        RedisSentinel()


def test_a_port_taken_meanwhile_is_chosen_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port found free but taken before its node listens (another program was
    quicker) costs a retry with new ports, not a failed start. Fails if the cluster
    gives up, or runs a node on the taken port."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    choices: list[list[int]] = []

    def choose(count: int, *, bus: bool = False) -> list[int]:
        chosen = free_ports(count, bus=bus)
        if not choices:
            chosen[0] = port  # as if it had been free a moment before
        choices.append(chosen)
        return chosen

    monkeypatch.setattr("statekit.testing.redis_cluster.free_ports", choose)
    try:
        with RedisCluster(masters=3, replicas=0) as cluster:
            assert len(choices) == 2
            assert port not in [p for _, p in cluster.startup_nodes]
            assert len(cluster.masters()) == 3
    finally:
        taken.close()


def test_a_cluster_that_does_not_come_up_says_why() -> None:
    """A start that runs out of time raises, naming what did not happen and showing
    the end of the nodes' logs, and leaves no node running."""
    before = redis_children()
    cluster = RedisCluster(start_timeout=0)
    with pytest.raises(RuntimeError, match=r"(?s)did not answer in time.*-- cluster node"):
        cluster.start()
    assert redis_children() == before


def test_impossible_topologies_are_refused() -> None:
    """Counts Redis cannot make a cluster or a failover of are refused at once."""
    with pytest.raises(ValueError, match="at least 3 masters"):
        RedisCluster(masters=2)
    with pytest.raises(ValueError, match="at least 1 replica"):
        RedisSentinel(replicas=0)
    with pytest.raises(ValueError, match="quorum"):
        RedisSentinel(quorum=4)
