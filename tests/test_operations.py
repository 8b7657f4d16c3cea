"""engine.stats(): the figures an operator reads (events, waits and holds, conflicts,
busy sessions, renewals, sessions ended by reason, the largest values), checked on
every store; and the warnings an engine logs, rate-limited, on a FakeClock.

Times are on the engine's clock, which the tests move: a FakeClock advanced inside an
event is how long that event held its session. "Another process" is a second engine on
the same store.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from statekit import (
    DeleteReason,
    EngineClosed,
    EngineStats,
    InvalidDeclaration,
    LeaseLost,
    MemoryStore,
    SessionBusy,
    StateEngine,
    StoreUnavailable,
    Timings,
    ValueSize,
)
from statekit._metrics import WINDOW
from statekit.integrations import prometheus
from statekit.testing import FakeClock

from .conftest import StoreFactory, declared


def make_engine(make_store: StoreFactory, clock: FakeClock, **options: Any) -> StateEngine:
    settings: dict[str, Any] = {
        "app": "ops",
        "clock": clock,
        "idle_ttl": 60,
        "closed_ttl": 30,
        "lease_ttl": 30,
        "lease_wait": 5,
        "capacity": 100,
    }
    engine = StateEngine(make_store(), **{**settings, **options})
    engine.session_state("note", "")
    engine.session_state("cart", [])
    return engine


def within(timeout: float, condition: Callable[[], bool]) -> None:
    """Wait (bounded) for another thread to reach a state; not a timing."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the other thread never got there"
        time.sleep(0.002)


def test_a_new_engine_reports_nothing_yet(make_store: StoreFactory) -> None:
    """Before any event every figure is zero, and every reason is listed (a dashboard
    reads each key). Fails if a reason is missing or a figure starts elsewhere."""
    engine = make_engine(make_store, FakeClock())
    stats = engine.stats()
    assert stats == EngineStats(
        sessions=0,
        held=0,
        waiting=0,
        ended={reason.value: 0 for reason in DeleteReason},
        lease_wait=Timings(p50=0.0, p99=0.0, samples=0),
        lease_hold=Timings(p50=0.0, p99=0.0, samples=0),
    )
    engine.shutdown()


def test_events_and_how_long_they_held_their_sessions(make_store: StoreFactory) -> None:
    """Three events holding their session 2, 4 and 6 s (on the engine's clock): three
    events, hold p50 4 s and p99 6 s, no wait; a failed block counts as an event too.
    Fails if events are miscounted or holds are not measured from entering to
    leaving the block."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    note = declared(engine, "note")
    sid = engine.open_session()
    for seconds in (2, 6, 4):
        with engine.event(sid) as ev:
            clock.advance(seconds)
            ev[note] = f"held {seconds}"
    with pytest.raises(KeyError), engine.event(sid):
        raise KeyError("the handler failed")
    stats = engine.stats()
    assert stats.events == 4
    assert stats.sessions == 1
    assert stats.lease_hold == Timings(p50=2.0, p99=6.0, samples=4)  # 0, 2, 4, 6
    assert stats.lease_wait == Timings(p50=0.0, p99=0.0, samples=4)
    assert (stats.conflicts, stats.busy, stats.renewals, stats.leases_lost) == (0, 0, 0, 0)
    engine.shutdown()


def test_a_wait_and_a_busy_session_are_counted(make_store: StoreFactory) -> None:
    """An event that waited 3 s for its session (another event held it) shows in the
    wait percentiles; one that gave up (lease_wait) counts as busy. Fails if waits are
    not measured or SessionBusy is not counted."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    quick = make_engine(make_store, clock, lease_wait=0.05)
    note = declared(engine, "note")
    sid = engine.open_session()
    done: list[str] = []

    def waiter() -> None:
        with engine.event(sid) as ev:
            ev[note] = "after the wait"
        done.append("entered")

    def gives_up() -> None:
        try:
            with quick.event(sid):
                pass
        except SessionBusy:
            done.append("busy")

    with engine.event(sid):
        thread = threading.Thread(target=waiter)
        thread.start()
        within(10, lambda: engine.stats().waiting >= 1)
        clock.advance(3)
        other = threading.Thread(target=gives_up)
        other.start()
        other.join(timeout=30)
    thread.join(timeout=30)
    assert sorted(done) == ["busy", "entered"]
    stats = engine.stats()
    assert stats.events == 2
    assert stats.lease_wait.p99 == 3.0
    assert stats.lease_hold.p99 == 3.0
    assert quick.stats().busy == 1
    engine.shutdown()
    quick.shutdown()


def test_renewals_conflicts_and_lost_leases(make_store: StoreFactory) -> None:
    """On a shared store ev.extend() counts a renewal, and an event whose lease lapsed
    and was taken counts as a conflict and a lost lease; on the memory store neither
    happens (sessions are held by a lock of this process). Fails if a renewal or a
    LeaseLost goes uncounted, or if one event is counted once per call that found its
    lease lost (two renewals and its commit counted 3)."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    rival = make_engine(make_store, clock)
    note = declared(engine, "note")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        clock.advance(20)
        ev.extend()
        ev[note] = "renewed"
    shared = engine.store.shared
    if shared:
        with pytest.raises(LeaseLost), engine.event(sid) as ev:
            clock.advance(31)
            with rival.event(sid) as theirs:
                theirs[declared(rival, "note")] = "taken"
            for _ in range(2):  # each renewal finds it lost: still one event lost
                with pytest.raises(LeaseLost):
                    ev.extend()
            ev[note] = "too late"
    stats = engine.stats()
    assert stats.renewals == (1 if shared else 0)
    assert (stats.conflicts, stats.leases_lost) == ((1, 1) if shared else (0, 0))
    assert rival.stats().conflicts == 0
    engine.shutdown()
    rival.shutdown()


def test_the_figures_an_engine_ended_with_are_read_after_its_shutdown(
    make_store: StoreFactory,
) -> None:
    """``stats()`` answers after a shutdown, with the figures the engine ended with: on
    the memory store, ``ended["shutdown"]`` counts the sessions the shutdown ended (a
    host logs them at exit); a shared store keeps its sessions (they outlive the
    process), and its count is still read. Fails if stats() raises after shutdown (the
    shutdown figure could never be read) or the figures are lost."""
    engine = make_engine(make_store, FakeClock())
    sids = [engine.open_session() for _ in range(3)]
    with engine.event(sids[0]):
        pass
    engine.shutdown()
    stats = engine.stats()
    shared = engine.store.shared
    assert stats.ended["shutdown"] == (0 if shared else 3)
    assert stats.sessions == (3 if shared else 0)
    assert (stats.events, stats.lease_hold.samples) == (1, 1)
    assert asyncio.run(engine.astats()) == stats
    with pytest.raises(EngineClosed):
        engine.session_count()  # every other call is refused, as before


def test_sessions_ended_by_reason(make_store: StoreFactory) -> None:
    """Sessions evicted at capacity, reaped when idle, and deleted after their close
    grace are counted by reason, by the engine that removed them. Fails if a reason is
    miscounted, or a closed session is counted twice (at close and at deletion)."""
    clock = FakeClock()
    engine = make_engine(make_store, clock, capacity=3)
    opened = []
    for _ in range(3):
        opened.append(engine.open_session())
        clock.advance(1)
    first, second, third = opened
    engine.open_session()  # evicts the least recently used: first
    assert engine.close_session(second) is True
    clock.advance(31)  # the closed session's grace is over
    assert engine.reap() == 1
    clock.advance(30)  # the open ones are idle (60 s)
    assert engine.reap() == 2
    stats = engine.stats()
    assert stats.ended == {"idle": 2, "closed": 1, "evicted": 1, "ttl": 0, "shutdown": 0}
    assert stats.sessions == 0
    assert not engine.exists(first)
    assert not engine.exists(third)
    engine.shutdown()


def test_the_largest_values_by_name_only(make_store: StoreFactory) -> None:
    """The largest values written are named with their sizes, largest first, and never
    shown: a cart of 2,000 items outranks a note. Fails if sizes are not noted, the
    order is wrong, or a value's content leaks into the figures."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    note, cart = declared(engine, "note"), declared(engine, "cart")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[cart] = [f"item-{i}" for i in range(2000)]
        ev[note] = "secret-note"
    with engine.event(sid) as ev:
        ev[cart] = ["small"]
    largest = engine.stats().largest
    assert [v.state for v in largest] == ["cart", "note"]
    assert largest[0].size > 10_000 > largest[1].size >= len("secret-note")
    assert all(isinstance(v, ValueSize) for v in largest)
    assert "secret" not in repr(engine.stats())
    assert "item-" not in repr(engine.stats())
    engine.shutdown()


def test_the_windows_are_bounded(engine: StateEngine, clock: FakeClock) -> None:
    """Percentiles are taken over the latest WINDOW events, so that memory stays
    bounded however long the engine runs; the event count goes on. Fails if the
    samples grow without bound."""
    sid = engine.open_session()
    for i in range(WINDOW + 50):
        with engine.event(sid):
            if i >= 50:
                clock.advance(1)
    stats = engine.stats()
    assert stats.events == WINDOW + 50
    assert stats.lease_hold == Timings(p50=1.0, p99=1.0, samples=WINDOW)


def test_astats_reads_the_same(make_store: StoreFactory) -> None:
    """await engine.astats() gives what stats() gives."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[declared(engine, "note")] = "x"
    assert asyncio.run(engine.astats()) == engine.stats()
    engine.shutdown()


@pytest.fixture
def statekit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="statekit")
    return caplog


def said(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


def test_a_slow_event_is_logged_once_a_minute(
    make_store: StoreFactory, statekit_log: pytest.LogCaptureFixture
) -> None:
    """An event holding its session past warn_hold logs a warning naming the session
    by its short label only; more slow events within the minute are held back and
    counted in the next warning. Fails if every slow event logs (a flood), if none
    does, or if the whole session id (a bearer secret) appears."""
    clock = FakeClock()
    engine = make_engine(make_store, clock, warn_hold=5, idle_ttl=3600)
    sid = engine.open_session()
    for seconds in (4, 6, 7, 8):  # the first is within warn_hold
        with engine.event(sid):
            clock.advance(seconds)
    first = said(statekit_log, "an event held session")
    assert len(first) == 1
    assert "6s" in first[0]
    assert "warn_hold=5s" in first[0]
    assert sid not in statekit_log.text
    clock.advance(60)
    with engine.event(sid):
        clock.advance(9)
    warnings = said(statekit_log, "an event held session")
    assert len(warnings) == 2
    assert "9s" in warnings[1]
    assert "2 more since the last" in warnings[1]
    engine.shutdown()


def test_a_large_value_is_logged_by_name_once_a_minute(
    make_store: StoreFactory, statekit_log: pytest.LogCaptureFixture
) -> None:
    """A value written larger than warn_size logs a warning naming its state and size,
    never its content, at most once a minute. Fails if the value leaks into the log,
    or if small values or every large write warn."""
    clock = FakeClock()
    engine = make_engine(make_store, clock, warn_size=1000, idle_ttl=3600)
    cart = declared(engine, "cart")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[cart] = ["tiny"]
    assert said(statekit_log, "wrote a value") == []
    for n in (500, 600):
        with engine.event(sid) as ev:
            ev[cart] = [f"secret-{i}" for i in range(n)]
    warnings = said(statekit_log, "wrote a value")
    assert len(warnings) == 1
    assert "'cart'" in warnings[0]
    assert "warn_size=1000 bytes" in warnings[0]
    assert "secret" not in statekit_log.text
    clock.advance(61)
    with engine.event(sid) as ev:
        ev[cart] = [f"secret-{i}" for i in range(700)]
    warnings = said(statekit_log, "wrote a value")
    assert len(warnings) == 2
    assert "1 more since the last" in warnings[1]
    engine.shutdown()


def test_warnings_can_be_turned_off(
    engine: StateEngine, clock: FakeClock, statekit_log: pytest.LogCaptureFixture
) -> None:
    """warn_hold=None and warn_size=None log nothing, however slow or large."""
    quiet = StateEngine(clock=clock, app="quiet", warn_hold=None, warn_size=None)
    big = quiet.session_state("big", "")
    sid = quiet.open_session()
    with quiet.event(sid) as ev:
        clock.advance(3600)
        ev[big] = "x" * 2_000_000
    assert statekit_log.records == []
    quiet.shutdown()


@pytest.mark.parametrize(
    ("option", "value"),
    [("warn_hold", 0), ("warn_hold", "5"), ("warn_size", 0), ("warn_size", 1.5)],
)
def test_bad_thresholds_are_refused(option: str, value: Any) -> None:
    with pytest.raises(InvalidDeclaration, match=option):
        StateEngine(**{option: value})


# -- the Prometheus exporter ------------------------------------------------------------


def scrape(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_prometheus_reads_the_stats_at_scrape_time(make_store: StoreFactory) -> None:
    """A registry scraped after some events reports the engine's figures, labelled by
    app: counters, ended sessions by reason, percentiles, the largest values, and the
    store up. Fails if a metric is missing, stale (read at registration instead of
    scrape) or labelled wrongly."""
    clock = FakeClock()
    engine = make_engine(make_store, clock, capacity=2)
    cart = declared(engine, "cart")
    registry = CollectorRegistry()
    prometheus.register(engine, registry)
    assert scrape(registry, "statekit_events_total", app="ops") == 0
    sid = engine.open_session()
    for seconds in (1, 3):
        with engine.event(sid) as ev:
            clock.advance(seconds)
            ev[cart] = ["item"] * 100
    engine.open_session()
    engine.open_session()  # evicts the first
    stats = engine.stats()
    text = generate_latest(registry).decode()
    assert 'statekit_events_total{app="ops"} 2.0' in text
    assert scrape(registry, "statekit_sessions", app="ops") == stats.sessions == 2
    assert scrape(registry, "statekit_sessions_held", app="ops") == 0
    assert scrape(registry, "statekit_sessions_ended_total", app="ops", reason="evicted") == 1
    assert scrape(registry, "statekit_sessions_ended_total", app="ops", reason="idle") == 0
    assert scrape(registry, "statekit_lease_hold_seconds", app="ops", quantile="0.99") == 3.0
    assert scrape(registry, "statekit_lease_wait_seconds", app="ops", quantile="0.5") == 0.0
    assert scrape(registry, "statekit_value_largest_bytes", app="ops", state="cart") == (
        stats.largest[0].size
    )
    for name in ("conflicts", "busy", "lease_renewals", "leases_lost"):
        assert scrape(registry, f"statekit_{name}_total", app="ops") == 0
    assert scrape(registry, "statekit_store_up", app="ops") == 1
    engine.shutdown()


def test_prometheus_serves_several_engines_and_leaves_out_ended_ones() -> None:
    """Two engines (apps) on one registry share one collector, each labelled; an engine
    shut down drops out of the next scrape. Fails if the second registration clashes
    (duplicate metrics) or a closed engine breaks the scrape."""
    registry = CollectorRegistry()
    shop, blog = StateEngine(app="shop"), StateEngine(app="blog")
    assert prometheus.register(shop, registry) is prometheus.register(blog, registry)
    prometheus.register(shop, registry)  # twice: nothing more
    shop.open_session()
    assert scrape(registry, "statekit_sessions", app="shop") == 1
    assert scrape(registry, "statekit_sessions", app="blog") == 0
    shop.shutdown()
    assert scrape(registry, "statekit_sessions", app="shop") is None
    assert scrape(registry, "statekit_store_up", app="blog") == 1
    blog.shutdown()


def test_prometheus_refuses_a_second_engine_of_one_app_on_one_registry() -> None:
    """Two engines of one app (a setup lifetimes.md describes) on one registry gave
    duplicate series, which break the exposition format and lose one engine's
    figures. The second registration is refused, naming the app; once the first is
    shut down, another takes its place. Fails if the duplicate is accepted."""
    registry = CollectorRegistry()
    first, second = StateEngine(app="shop"), StateEngine(app="shop")
    prometheus.register(first, registry)
    with pytest.raises(ValueError, match="app 'shop' reports its metrics on this registry"):
        prometheus.register(second, registry)
    assert generate_latest(registry).count(b'statekit_events_total{app="shop"}') == 1
    first.shutdown()
    prometheus.register(second, registry)
    second.open_session()
    assert scrape(registry, "statekit_sessions", app="shop") == 1
    second.shutdown()


class Unreachable(MemoryStore):
    """A store that cannot count its sessions, as an unreachable one."""

    def namespace(self, app: str) -> Any:
        ns = super().namespace(app)

        class Handle:
            def __getattr__(self, name: str) -> Any:
                return getattr(ns, name)

            def session_count(self) -> int:
                raise StoreUnavailable("the store", "connection refused")

        return Handle()


def test_prometheus_reports_a_store_that_does_not_answer(
    statekit_log: pytest.LogCaptureFixture,
) -> None:
    """When the store cannot be asked, the scrape still succeeds and says so
    (statekit_store_up 0) rather than failing every metric of the process."""
    registry = CollectorRegistry()
    engine = StateEngine(Unreachable(), app="down")
    prometheus.register(engine, registry)
    assert scrape(registry, "statekit_store_up", app="down") == 0
    assert scrape(registry, "statekit_events_total", app="down") is None
    assert said(statekit_log, "the store failed")
    engine.shutdown()


# -- the operations page ---------------------------------------------------------------


def test_the_operations_page_names_every_figure_and_metric() -> None:
    """docs/operations.md lists each EngineStats field and each exported metric: a
    field or metric added without its line (or a line left after one is removed)
    fails here."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE)
    fields = {name for name in rows if not name.startswith("statekit_")}
    assert fields == {field.name for field in attrs.fields(EngineStats)}
    documented = set(re.findall(r"`(statekit_\w+)`", page))
    registry = CollectorRegistry()
    engine = StateEngine(app="page")
    engine.session_state("note", "")
    with engine.event(engine.open_session()) as ev:
        ev[declared(engine, "note")] = "x"
    prometheus.register(engine, registry)
    exported = {
        sample.name
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert documented == exported
    engine.shutdown()


def test_a_clock_that_steps_back_neither_silences_warnings_nor_holds_less_than_nothing(
    statekit_log: pytest.LogCaptureFixture,
) -> None:
    """A wall clock that steps back (an NTP correction) used to hold every slow-event
    warning back until it caught up again (an hour here), and an event across the step
    counted a negative hold on the memory store. Fails if the second slow event goes
    unlogged or if the hold figures go below zero."""
    now = [10_000.0]
    engine = StateEngine(clock=lambda: now[0], warn_hold=1)
    sid = engine.open_session()
    with engine.event(sid):
        now[0] += 2  # slow: logged
    now[0] -= 3600  # the clock steps back an hour
    with engine.event(sid):
        now[0] -= 5  # and back again, inside an event
    with engine.event(sid):
        now[0] += 2  # slow again
    assert len(said(statekit_log, "an event held session")) == 2
    hold = engine.stats().lease_hold
    assert hold.p50 >= 0
    assert hold.p99 >= 0
    engine.shutdown()


def test_large_bytes_and_text_are_sized_in_bytes_on_every_store(
    make_store: StoreFactory, statekit_log: pytest.LogCaptureFixture
) -> None:
    """A 5 MB bytes value went unsized on the memory store (no figure, no warning),
    and text was sized by its characters: 900,000 three-byte characters counted as
    900,000, under a 1 MB warn_size, where a codec writes 2.7 MB. Fails if either
    goes unwarned, or if a store sizes the text below its UTF-8 length."""
    engine = make_engine(make_store, FakeClock(), warn_size=1_000_000)
    upload = engine.session_state("upload", b"")
    text = engine.session_state("text", "")
    sid = engine.open_session()
    with engine.event(sid) as ev:
        ev[upload] = b"x" * 5_000_000
    with engine.event(sid) as ev:
        ev[text] = "\u4e2d" * 900_000
    sizes = {value.state: value.size for value in engine.stats().largest}
    assert sizes["upload"] >= 5_000_000
    assert sizes["text"] >= 2_700_000
    assert len(said(statekit_log, "state 'upload' wrote a value of")) == 1
    engine.shutdown()


def holders(
    engine: StateEngine, sid_a: str, sid_b: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Two threads: one holds session ``sid_a``, the other ``sid_b`` and user u1's
    record, each until its ``let go`` (returned, in that order) is called, which also
    waits for it to end. Returns once both hold what they hold."""
    inside: list[str] = []

    def start(sid: str, **kwargs: Any) -> Callable[[], None]:
        release = threading.Event()

        def hold() -> None:
            with engine.event(sid, **kwargs):
                inside.append(sid)
                release.wait(30)

        thread = threading.Thread(target=hold)
        thread.start()

        def let_go() -> None:
            release.set()
            thread.join(timeout=30)

        return let_go

    let_go = start(sid_a), start(sid_b, user="u1")
    within(10, lambda: len(inside) == 2)
    return let_go


def test_an_event_of_a_user_that_waits_twice_is_one_wait(make_store: StoreFactory) -> None:
    """An event of a user waits for its session, then for its user's record: 1 s and
    2 s here, one wait of 3 s. They were two samples, and the window of the latest
    events then dropped one of the other events' zero waits: three events that waited
    0, 0 and 3 s read p50=1. Fails unless the figures are those of [0, 0, 3]."""
    clock = FakeClock()
    engine = make_engine(make_store, clock)
    engine.user_state("plan", "free")
    sid_a, sid_b = engine.open_session(), engine.open_session()
    let_go_a, let_go_u = holders(engine, sid_a, sid_b)

    def waiter() -> None:
        with engine.event(sid_a, user="u1"):
            pass

    thread = threading.Thread(target=waiter)
    thread.start()
    within(10, lambda: engine.stats().waiting >= 1)
    clock.advance(1)  # for its session
    let_go_a()
    within(10, lambda: engine.stats().waiting >= 1)
    clock.advance(2)  # then for its user's record
    let_go_u()
    thread.join(timeout=30)
    wait = engine.stats().lease_wait
    assert (wait.p50, wait.p99, wait.samples) == (0.0, 3.0, 3)
    engine.shutdown()


def test_an_event_of_a_user_that_cannot_take_its_record_still_counts_its_wait(
    clock: FakeClock,
) -> None:
    """An event of a user waited 2 s for its session, then gave up on its user's
    record (SessionBusy): its wait for the session was kept on the event for one
    sample with the record's, and dropped when the record was not taken. Fails
    unless lease_wait still shows the 2 s."""
    engine = StateEngine(clock=clock, lease_wait=3)  # (a real-time bound on the wait)
    engine.user_state("plan", "free")
    sid_a, sid_b = engine.open_session(), engine.open_session()
    let_go_a, let_go_u = holders(engine, sid_a, sid_b)
    outcome: list[str] = []

    def waiter() -> None:
        quick = engine.event(sid_a, user="u1")
        try:
            with quick:
                pass
        except SessionBusy:
            outcome.append("busy")

    thread = threading.Thread(target=waiter)
    thread.start()
    within(10, lambda: engine.stats().waiting >= 1)
    clock.advance(2)  # for its session
    let_go_a()
    thread.join(timeout=60)  # then it gives up on the user's record (lease_wait)
    let_go_u()
    assert outcome == ["busy"]
    assert engine.stats().lease_wait.p99 == 2.0
    engine.shutdown()
