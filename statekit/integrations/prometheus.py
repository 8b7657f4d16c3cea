"""Prometheus metrics of statekit engines, read from ``engine.stats()`` at scrape time.

Install with ``pip install 'statekit[prometheus]'`` (``prometheus_client``)::

    from prometheus_client import start_http_server
    from statekit.integrations.prometheus import register

    register(engine)  # on prometheus_client's default registry
    start_http_server(9100)  # or mount prometheus_client's ASGI/WSGI app

Nothing is counted twice: the engine counts (see :class:`~statekit.EngineStats`), and
each scrape reads its figures once, asking the store for its session count (one store
call per engine per scrape). Every metric carries the engine's ``app`` as a label, so
the engines of one process (several apps) share one collector per registry:

==========================================  ======  ======================================
metric                                      type    from ``engine.stats()``
==========================================  ======  ======================================
``statekit_sessions``                       gauge   ``sessions``: live, of every process
``statekit_sessions_held``                  gauge   ``held``
``statekit_events_waiting``                 gauge   ``waiting``
``statekit_events_total``                   counter ``events``
``statekit_conflicts_total``                counter ``conflicts``
``statekit_busy_total``                     counter ``busy``
``statekit_lease_renewals_total``           counter ``renewals``
``statekit_leases_kept``                    gauge   ``kept``
``statekit_kept_events_total``              counter ``kept_events``
``statekit_leases_lost_total``              counter ``leases_lost``
``statekit_sessions_ended_total{reason}``   counter ``ended``
``statekit_lease_wait_seconds{quantile}``   gauge   ``lease_wait`` (0.5 and 0.99)
``statekit_lease_hold_seconds{quantile}``   gauge   ``lease_hold`` (0.5 and 0.99)
``statekit_value_largest_bytes{state}``     gauge   ``largest``
``statekit_store_up``                       gauge   1, or 0 when the store could not be
                                                    asked (then only this is reported)
==========================================  ======  ======================================

Counters are this process's since its engine was made; sum them over processes in the
query (``sum by (app) (rate(statekit_events_total[5m]))``).

Thread-safe: prometheus_client may scrape from any thread. An engine is held weakly and
left out once shut down.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "statekit.integrations.prometheus needs prometheus_client: "
        "pip install 'statekit[prometheus]'"
    ) from exc

from statekit.exceptions import EngineClosed

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from statekit import EngineStats, StateEngine

__all__ = ["StatekitCollector", "register"]

logger = logging.getLogger("statekit")

_QUANTILES = (("0.5", "p50"), ("0.99", "p99"))
_Family = GaugeMetricFamily | CounterMetricFamily


class StatekitCollector(Collector):
    """A prometheus_client collector of the figures of the engines added to it.

    Use :func:`register` rather than making one: it keeps one collector per registry.
    """

    def __init__(self) -> None:
        self._engines: weakref.WeakSet[StateEngine] = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, engine: StateEngine) -> None:
        """Report ``engine``'s figures from the next scrape on.

        Raises:
            ValueError: another engine of the same app, not shut down, reports here
                already: its series and this one's would carry the same labels.
        """
        with self._lock:
            for other in self._engines:
                if other is not engine and other.app == engine.app and not other.closed:
                    raise ValueError(
                        f"an engine of app {engine.app!r} reports its metrics on this "
                        "registry already, and metrics are labelled by app only: two "
                        "engines of one app would report the same series twice. Register "
                        "one engine per app (or give each engine an app of its own)"
                    )
            self._engines.add(engine)

    def describe(self) -> Iterator[Metric]:
        """The metrics, without samples: registering asks no store."""
        return iter(_families().values())

    def collect(self) -> Iterator[Metric]:
        """The metrics of every registered engine, read from ``engine.stats()`` now
        (prometheus_client calls it at each scrape)."""
        with self._lock:
            engines = sorted(self._engines, key=lambda engine: engine.app)
        families = _families()
        up = families["store_up"]
        for engine in engines:
            if engine.closed:
                continue
            try:
                stats = engine.stats()
            except EngineClosed:  # shut down meanwhile
                continue
            except Exception as exc:
                logger.warning("statekit metrics of app %r: the store failed: %s", engine.app, exc)
                up.add_metric([engine.app], 0)
                continue
            up.add_metric([engine.app], 1)
            _add(families, engine.app, stats)
        return iter(families.values())


def _families() -> dict[str, _Family]:
    def gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"statekit_{name}", doc, labels=["app", *labels])

    def counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
        return CounterMetricFamily(f"statekit_{name}", doc, labels=["app", *labels])

    return {
        "sessions": gauge("sessions", "Live sessions in the store (open or closed)."),
        "held": gauge("sessions_held", "Sessions events of this process hold or wait for."),
        "waiting": gauge("events_waiting", "Events waiting for a session another holds."),
        "events": counter("events", "Events that entered their session."),
        "conflicts": counter("conflicts", "Events whose commit was refused (StoreConflict)."),
        "busy": counter("busy", "Events that gave up waiting for their session (SessionBusy)."),
        "renewals": counter("lease_renewals", "Leases renewed by long events."),
        "kept": gauge("leases_kept", "Sessions whose leases this process keeps between events."),
        "kept_events": counter("kept_events", "Events that ran on a kept lease, without a load."),
        "leases_lost": counter("leases_lost", "Events that lost their lease (LeaseLost)."),
        "ended": counter("sessions_ended", "Sessions this process removed, by reason.", "reason"),
        "lease_wait": gauge(
            "lease_wait_seconds",
            "How long the latest events waited for their session.",
            "quantile",
        ),
        "lease_hold": gauge(
            "lease_hold_seconds", "How long the latest events held their session.", "quantile"
        ),
        "largest": gauge(
            "value_largest_bytes", "The largest value written, per state (bytes).", "state"
        ),
        "store_up": gauge("store_up", "1 when the store answered this scrape, else 0."),
    }


def _add(families: dict[str, _Family], app: str, stats: EngineStats) -> None:
    def add(key: str, value: float, *labels: str) -> None:
        families[key].add_metric([app, *labels], value)

    add("sessions", stats.sessions)
    add("held", stats.held)
    add("waiting", stats.waiting)
    add("kept", stats.kept)
    for key in ("events", "conflicts", "busy", "renewals", "kept_events", "leases_lost"):
        add(key, getattr(stats, key))
    for reason, count in sorted(stats.ended.items()):
        add("ended", count, reason)
    for quantile, field in _QUANTILES:
        add("lease_wait", getattr(stats.lease_wait, field), quantile)
        add("lease_hold", getattr(stats.lease_hold, field), quantile)
    for value in stats.largest:
        add("largest", value.size, value.state)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, StatekitCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(engine: StateEngine, registry: CollectorRegistry | None = None) -> StatekitCollector:
    """Report ``engine``'s figures on ``registry`` (prometheus_client's default
    registry if omitted), labelled with its ``app``. Several engines may be registered
    on one registry (one collector serves them), one per app; registering one twice
    does nothing more.

    Returns:
        the registry's :class:`StatekitCollector`.

    Raises:
        ValueError: another engine of the same app, not shut down, is registered on
            ``registry`` already (their series would carry the same labels).
    """
    target = REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is None:
            collector = _collectors[target] = StatekitCollector()
            target.register(collector)
    collector.add(engine)
    return collector
