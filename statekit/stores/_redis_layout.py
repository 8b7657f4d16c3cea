"""Where an application's keys live in Redis: the hash tags that put a session's keys
on one cluster slot, and the buckets that spread sessions over the cluster's masters.

Every key is ``<prefix>:{<tag>}:<rest>``; Redis Cluster places a key by its tag (the
text between the braces) only, so every key of one tag is on one slot, and a script
may touch them all.

**Buckets.** An app's sessions are split into ``N`` buckets by their id (``crc32(sid) %
N``); each bucket has its own tag, and with it its own deadline index ``dl``, capacity
orders ``lru`` and ``closed``, request keys ``q:<id>`` and notice channel ``notices``,
all on one slot beside its sessions' hashes ``s:<sid>`` and tombstones ``gone:<sid>``,
and the channel ``wanted`` of requests for kept leases. So every script about a session
touches one slot, and the sessions, their writes and their notices spread over the
masters. With one bucket (the default on a single server and on Sentinel) the tag is the
app's name, and all of an app's keys, globals included, share it.

**Even spread.** A tag made of a counter would land on a random slot, and with a few
dozen buckets the masters would get noticeably uneven shares. Bucket ``k`` of ``N``
takes instead the first tag ``<app>#<k>.<j>`` (``j = 0, 1, ...``) whose slot falls in
the middle half of the ``k``-th of ``N`` equal slices of the 16384 slots. A cluster
that splits its slots into equal ranges (as ``redis-cli --cluster create`` does)
then gives each master the same number of buckets when ``N`` is a multiple of the
number of masters (48 serves 2, 3, 4, 6, 8, 12 and 16 masters).

**Globals** live on slots of their own when there are several buckets: a global's
tag is ``<app>#g:<name>``, shared by its hash and its request keys only. App and
state names cannot hold ``#``, ``{`` or ``}``, so no two tags of different apps or
kinds meet.
"""

from __future__ import annotations

import binascii
import functools
import zlib

__all__ = ["MAX_BUCKETS", "Bucket", "Layout", "key_slot"]

#: The slots of a Redis Cluster.
SLOTS = 16384
#: Buckets at most: finding each bucket's tag tries about 2N tags.
MAX_BUCKETS = 256


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``, as Redis computes it (CRC16 of its hash tag)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) % SLOTS


@functools.lru_cache(maxsize=256)
def bucket_tags(app: str, buckets: int) -> tuple[str, ...]:
    """The tag of each bucket of ``app`` (see Even spread above)."""
    if buckets == 1:
        return (app,)
    width = SLOTS / buckets
    tags = []
    for k in range(buckets):
        low, high = k * width + width / 4, k * width + 3 * width / 4
        j = 0
        while not low <= key_slot(f"{app}#{k}.{j}".encode()) < high:
            j += 1
        tags.append(f"{app}#{k}.{j}")
    return tuple(tags)


class Bucket:
    """The keys of one bucket: its key prefix ``P`` (sessions are ``P + "s:" + sid``),
    its indexes (as bytes, which the client sends as they are) and its notice channel.
    ``settings`` is the first argument of every app script run on the bucket (see
    ``_redis_scripts``); the namespace sets it. Mutable only through ``settings``."""

    __slots__ = ("P", "channel", "closed", "dl", "index", "lru", "settings", "wanted")

    def __init__(self, index: int, prefix: str) -> None:
        self.index = index
        self.P = prefix
        self.dl, self.lru, self.closed = (
            prefix.encode() + name for name in (b"dl", b"lru", b"closed")
        )
        self.channel = prefix + "notices"
        # Where loads ask for leases kept between events: a channel of its own, so
        # that an engine that keeps leases does not receive every commit's notice.
        self.wanted = prefix + "wanted"
        self.settings = b""

    def __repr__(self) -> str:
        return f"<bucket {self.index} {self.P!r}>"


class Layout:
    """The keys of application ``app`` under ``prefix``, in ``buckets`` buckets.
    Immutable but for the buckets' settings."""

    __slots__ = ("app", "buckets", "first", "prefix")

    def __init__(self, prefix: str, app: str, buckets: int) -> None:
        self.prefix = prefix
        self.app = app
        self.buckets = tuple(
            Bucket(k, f"{prefix}:{{{tag}}}:") for k, tag in enumerate(bucket_tags(app, buckets))
        )
        self.first = self.buckets[0]

    def of(self, sid: str | bytes) -> Bucket:
        """The bucket of session ``sid``."""
        if len(self.buckets) == 1:
            return self.first
        raw = sid.encode() if isinstance(sid, str) else sid
        return self.buckets[zlib.crc32(raw) % len(self.buckets)]

    def global_prefix(self, name: str) -> str:
        """The key prefix of global ``name``: its hash is ``+ "g:" + name``, its
        request keys ``+ "q:" + id``."""
        if len(self.buckets) == 1:
            return self.first.P
        return f"{self.prefix}:{{{self.app}#g:{name}}}:"
