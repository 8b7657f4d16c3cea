"""Worker processes for test_multiprocess.py (importable, so that they can be spawned)."""

from __future__ import annotations

import sys
import time
from typing import Any

from statekit import DeleteReason, SessionState, StateEngine
from statekit.stores import Store


def make_store(kind: str, where: str, prefix: str) -> Store:
    if kind == "sqlite":
        from statekit.stores.sqlite import SQLiteStore

        return SQLiteStore(where)
    from statekit.stores.redis import RedisStore

    return RedisStore(where, prefix=prefix)


def engine(kind: str, where: str, prefix: str, shift: float = 0.0, **kw: Any) -> StateEngine:
    clock = (lambda: time.time() + shift) if shift else None
    return StateEngine(make_store(kind, where, prefix), app="mp", clock=clock, **kw)


def increment(kind: str, where: str, prefix: str, times: int) -> None:
    eng = engine(kind, where, prefix)
    visitors = eng.global_state("visitors", 0)
    for _ in range(times):
        visitors.increment()


def append(kind: str, where: str, prefix: str, sid: str, worker: int, times: int) -> None:
    eng = engine(kind, where, prefix)
    log: SessionState[list[int]] = eng.session_state("log", [])
    for i in range(times):
        with eng.event(sid) as ev:
            ev[log].append(worker * 10_000 + i)


def reap(kind: str, where: str, prefix: str, shift: float, out: Any, start: Any) -> None:
    """Reap with a clock ``shift`` seconds ahead; report each deletion callback."""

    def record(value: str, reason: DeleteReason) -> None:
        out.put((value, reason.value))

    eng = engine(kind, where, prefix, shift=shift)
    eng.session_state("note", "", on_delete=record)
    start.wait()
    eng.reap()


def open_at_capacity(
    kind: str, where: str, prefix: str, capacity: int, times: int, start: Any, out: Any
) -> None:
    """Open ``times`` sessions (writing each one's id into it) at ``capacity``, all
    processes at once; report the sessions opened, the failures, and each deletion
    callback this process ran."""
    eng = engine(kind, where, prefix, capacity=capacity)
    deleted: list[str] = []
    mark = eng.session_state("mark", "", on_delete=lambda value, reason: deleted.append(value))
    opened: list[str] = []
    failures = 0
    start.wait()
    for _ in range(times):
        try:
            sid = eng.open_session()
        except Exception:
            failures += 1
            continue
        opened.append(sid)
        try:
            with eng.event(sid) as ev:
                ev[mark] = sid
        except Exception:  # evicted by another process already: nothing was written
            opened.pop()
    out.put((opened, failures, deleted))


def listen(kind: str, where: str, prefix: str, ready: Any, out: Any) -> None:
    """Report each remote change to ``cart`` as (sid, value, time received)."""
    eng = engine(kind, where, prefix)
    cart: SessionState[list[str]] = eng.session_state("cart", [])
    cart.on_remote_change(lambda sid, value: out.put((sid, value, time.time())))
    ready.set()
    time.sleep(30)  # the parent terminates this process when done


def count_forever(kind: str, where: str, prefix: str, sid: str) -> None:
    """Commit events forever, printing the counter after each acknowledged commit."""
    eng = engine(kind, where, prefix)
    counter = eng.session_state("counter", 0)
    while True:
        with eng.event(sid) as ev:
            ev[counter] += 1
            value = ev[counter]
        sys.stdout.write(f"{value}\n")
        sys.stdout.flush()


def increment_kept(where: str, prefix: str, sid: str, times: int) -> None:
    """Increment a session's counter ``times`` times, each event on an engine that
    keeps its leases between events."""
    eng = engine("redis", where, prefix, lease_keep=5, lease_wait=20)
    count = eng.session_state("count", 0)
    for _ in range(times):
        with eng.event(sid) as ev:
            ev[count] += 1
    eng.shutdown()


def user_events(kind: str, where: str, prefix: str, worker: int, times: int, out: Any) -> None:
    """From a session of its own, ``times`` events adding to user alice's cart and to
    the session's own count (the two commit together); report the session."""
    eng = engine(kind, where, prefix)
    cart: SessionState[list[int]] = eng.user_state("cart", [])
    count: SessionState[int] = eng.session_state("count", 0)
    sid = eng.open_session()
    for i in range(times):
        with eng.event(sid, user="alice") as ev:
            ev[cart].append(worker * 10_000 + i)
            ev[count] += 1
    out.put(sid)


def reap_users(kind: str, where: str, prefix: str, shift: float, out: Any, start: Any) -> None:
    """Reap with a clock ``shift`` seconds ahead; report each user value deleted."""

    def record(value: list[str], reason: DeleteReason) -> None:
        out.put((value, reason.value))

    eng = engine(kind, where, prefix, shift=shift, user_idle_ttl=60)
    eng.user_state("cart", [], on_delete=record)
    start.wait()
    eng.reap()


def die_in_a_users_commit(url: str, prefix: str, step: str, sid: str) -> None:
    """Commit an event of user alice from session ``sid`` on a Redis Cluster, and die
    (``os._exit``) as the commit's ``step`` script is about to be sent: the process
    that dies between two steps of a commit across slots."""
    import os

    from statekit.stores._redis_namespace import RedisNamespace
    from statekit.stores.redis import RedisStore

    send = RedisNamespace._run

    def run(self: Any, name: str, keys: list[Any], args: list[Any]) -> Any:
        if name == step:
            os._exit(3)
        return send(self, name, keys, args)

    RedisNamespace._run = run  # type: ignore[method-assign]
    eng = StateEngine(RedisStore(url, prefix=prefix), app="mp", lease_ttl=1)
    cart: SessionState[list[str]] = eng.user_state("cart", [])
    note: SessionState[str] = eng.session_state("note", "")
    with eng.event(sid, user="alice") as ev:
        ev[cart].append("from the process that died")
        ev[note] = "written with the cart"
    os._exit(0)  # not reached: the commit's step ended the process


if __name__ == "__main__":
    kind, where, prefix, sid = sys.argv[1:5]
    count_forever(kind, where, prefix, sid)
