"""Notices of a Redis namespace handle: the pub/sub receive loop and the reading of
each message.

Scripts publish a JSON notice on the channel of the session's bucket (see
``_redis_layout``: one channel per app with one bucket) for every commit and every ended
session (``{"k": kind, "s": sid, "o": origin, "r": reason, "n": names}``). A handle
skips its own notices, and a message that is not a statekit notice is ignored and
counted, never mistaken for a lost connection (which costs every subscriber a resync).
On a cluster, notices are sharded (``SPUBLISH``, received with ``SSUBSCRIBE``): each
bucket's channel lives on its bucket's master, so notices never cross the cluster bus
to every node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from statekit.exceptions import StoreUnavailable

from ._notices import NoticeFeed
from ._redis_layout import Layout
from .base import DeleteReason, Notice

__all__ = ["NoticeFeeds", "NoticeReceiver"]

logger = logging.getLogger("statekit")

_REASONS = frozenset(reason.value for reason in DeleteReason)
#: Warn about junk notices at the first and then every this many.
_JUNK_LOG_EVERY = 1000
#: Seconds the receiver pauses after reading what had come (see ``listen``): notices
#: arrive at most this much later, and in bursts.
_COALESCE = 0.005


class _Reconnects:
    """Set when the pub/sub connection connected again (redis-py keeps its connect
    callbacks as weak methods: this object holds the flag, the loop holds it)."""

    def __init__(self) -> None:
        self._seen = False

    def seen(self, connection: object) -> None:
        self._seen = True

    def take(self) -> bool:
        seen, self._seen = self._seen, False
        return seen


class NoticeReceiver:
    """Receives the notices of an app's channels for one handle (see ``NoticeFeed``,
    which runs :meth:`listen` in its thread).

    Args:
        client: the blocking client (it makes the pub/sub connections).
        channels: the app's notice channels, one per bucket.
        origin: the handle's current origin (it changes in the child of a fork).
        store: names the store in messages.
        timeout: seconds to wait for the server to confirm a subscription.
        sharded: the channels are shard channels (on a cluster).

    Attributes:
        ignored: how many messages were not statekit notices.
    """

    def __init__(
        self,
        client: Any,
        channels: list[str],
        origin: Callable[[], str],
        *,
        store: object,
        timeout: float,
        sharded: bool = False,
    ) -> None:
        self._client = client
        self.channels = channels
        self.channel = channels[0]
        self._sharded = sharded
        self._origin = origin
        self._store = store
        self._timeout = timeout
        self.ignored = 0

    def listen(
        self,
        stop: threading.Event,
        ready: threading.Event,
        deliver: Callable[[Notice], None],
    ) -> None:
        """Receive notices; after a lost connection, reconnect and send ``resync``.

        redis-py may reconnect (and subscribe again) by itself, without raising:
        notices published meanwhile were lost all the same, so a reconnection it makes
        is watched for and answered with a resync too."""
        lost = False
        delay = 0.05
        while not stop.is_set():
            pubsub = self._client.pubsub()
            reconnects = _Reconnects()
            try:
                self._subscribed(pubsub, stop)
                for connection in self._connections(pubsub):
                    connection.register_connect_callback(reconnects.seen)
                ready.set()
                if lost:
                    deliver(Notice(kind="resync", sid="", origin="redis"))
                    lost = False
                delay = 0.05
                while not stop.is_set():
                    message = self._next(pubsub, 0.2)
                    if reconnects.take():
                        deliver(Notice(kind="resync", sid="", origin="redis"))
                    if message is None:
                        continue
                    # Every commit of the app publishes, this process's own included:
                    # read what has come, then pause, so that this thread wakes (and
                    # takes the GIL from the app's threads) a few hundred times a second
                    # at most, not once per commit.
                    while message is not None:
                        if message.get("type") in ("message", "smessage"):
                            notice = self.read(message["data"])
                            if notice is not None:
                                deliver(notice)
                        message = self._next(pubsub, 0.0)
                    stop.wait(_COALESCE)
            except Exception:  # a lost connection, or the store being closed
                if stop.is_set():
                    break
                lost = True
                stop.wait(delay)
                delay = min(delay * 2, 2.0)
                if self._sharded:  # a master may have failed over: where is each slot?
                    with contextlib.suppress(Exception):
                        self._client.nodes_manager.initialize()
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _next(self, pubsub: Any, timeout: float) -> Any:
        """The next message, or None after ``timeout`` seconds.

        On a cluster, redis-py reads one master's connection per call, waiting there
        for the whole timeout while messages wait on another: one message per master
        per timeout. So every master is swept without waiting, then again after a
        pause that grows from 2 to 50 ms while nothing comes."""
        if not self._sharded:
            return pubsub.get_message(timeout=timeout)
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            for _ in range(max(1, len(pubsub.node_pubsub_mapping))):
                message = pubsub.get_sharded_message(timeout=0.0)
                if message is not None:
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)

    def _connections(self, pubsub: Any) -> list[Any]:
        """The connections a subscription holds (one per master holding a channel on
        a cluster)."""
        if self._sharded:
            nodes = list(pubsub.node_pubsub_mapping.values())
            return [node.connection for node in nodes if node.connection is not None]
        return [pubsub.connection]

    def _subscribed(self, pubsub: Any, stop: threading.Event) -> None:
        """Subscribe to the notice channels and wait until the server confirms each,
        so that every notice published from then on is received.

        Raises:
            StoreUnavailable: no confirmation within the timeout.
        """
        kind = "ssubscribe" if self._sharded else "subscribe"
        (pubsub.ssubscribe if self._sharded else pubsub.subscribe)(*self.channels)
        waiting = {channel.encode() for channel in self.channels}
        deadline = time.monotonic() + self._timeout
        while not stop.is_set() and time.monotonic() < deadline:
            message = self._next(pubsub, 0.1)
            if message is not None and message.get("type") == kind:
                waiting.discard(message.get("channel"))
                if not waiting:
                    return
        raise StoreUnavailable(str(self._store), "the notice subscription was not confirmed")

    def read(self, data: object) -> Notice | None:
        """The notice in a message of the channel; None for one of this handle's own,
        and for anything that is not a statekit notice (ignored and counted: a
        stray publisher must not cost every subscriber a resync)."""
        try:
            raw = json.loads(data)  # type: ignore[arg-type]
            kind, sid, origin = raw["k"], raw["s"], raw.get("o", "")
            names = raw.get("n") or []
            names = [] if names == {} else names  # Lua's cjson writes an empty list as {}
            reason = raw.get("r")
            if (
                kind not in ("changed", "ended", "wanted", "global")
                or type(sid) is not str
                or type(origin) is not str
                or type(names) is not list
                or any(type(name) is not str for name in names)
                or (reason is not None and reason not in _REASONS)
                or (kind == "ended" and reason is None)
            ):
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            self.ignored += 1
            if self.ignored % _JUNK_LOG_EVERY == 1:
                logger.warning(
                    "ignored a message on %r that is not a statekit notice (%d so far): "
                    "only statekit should publish there",
                    self.channel,
                    self.ignored,
                )
            return None
        if origin == self._origin():
            return None
        return Notice(
            kind=kind,
            sid=sid,
            names=tuple(names),
            reason=None if reason is None else DeleteReason(reason),
            origin=origin,
        )


class NoticeFeeds:
    """The notice feeds of one namespace handle, each a set of channels and a thread of
    its own (started by its first subscriber):

    - ``notices``: the app's commits and ended sessions, on each bucket's channel
      (``receiver`` counts what was not a statekit notice);
    - ``wanted``: requests for the leases this handle keeps between events, on each
      bucket's ``wanted`` channel, so that a keeper does not wake for every commit;
    - ``globals``: global writes, on one plain channel of the app (``globals_channel``;
      a global's slot is its own on a cluster, so its script cannot publish on a
      bucket's shard channel).
    """

    def __init__(self, store: Any, app: str, layout: Layout, origin: Callable[[], str]) -> None:
        def feed(
            kind: str, channels: list[str], sharded: bool
        ) -> tuple[NoticeReceiver, NoticeFeed]:
            receiver = NoticeReceiver(
                store.client,
                channels,
                origin,
                store=store,
                timeout=store.socket_timeout,
                sharded=sharded,
            )
            return receiver, NoticeFeed(
                f"statekit-redis-{kind}-{app}", receiver.listen, ready_timeout=store.socket_timeout
            )

        buckets = layout.buckets
        self.receiver, self.notices = feed(
            "notices", [bucket.channel for bucket in buckets], store.cluster
        )
        self.wanted = feed("wanted", [bucket.wanted for bucket in buckets], store.cluster)[1]
        self.globals_channel = f"{store.prefix}:{{{app}}}:globals"
        self.globals = feed("globals", [self.globals_channel], False)[1]

    def stop(self) -> None:
        """Stop every feed (waiting briefly for each thread)."""
        for each in (self.notices, self.wanted, self.globals):
            each.stop()
