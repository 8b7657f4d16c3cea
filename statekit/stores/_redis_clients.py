"""The client a Redis store talks through, made from a URL or recognized when given.

Three deployments, one store:

- ``redis://host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket): one
  server (``redis.Redis``);
- ``redis+cluster://host:port,host:port`` (``rediss+cluster://``): a Redis Cluster
  (``redis.cluster.RedisCluster``), found from any of the nodes named;
- ``redis+sentinel://host:port,host:port/service[/db]``: the master Sentinel names for
  ``service`` (``redis.sentinel.Sentinel(...).master_for(service)``), found again
  after a failover. A password in the URL is the master's.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio.cluster as aiocluster
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from ._redis_failures import default_retry

__all__ = ["FORMS", "address_of", "is_cluster", "make_client"]

FORMS = (
    "redis://host:port/db, rediss://..., redis+cluster://host:port,host:port, "
    "rediss+cluster://..., or redis+sentinel://host:port,host:port/service"
)


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (blocking or asyncio) talks to a Redis Cluster."""
    return isinstance(client, (RedisCluster, aiocluster.RedisCluster))


def _hosts(netloc: str, url: str) -> list[tuple[str, int]]:
    hosts = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"Redis URL {url!r} must name each node as host:port, separated by commas"
            )
        hosts.append((host.strip("[]"), int(port)))
    return hosts


def address_of(client: Any) -> str:
    """Where a caller's client leads, for messages (never its password): its server's
    address and database, a socket's path, or the kind of client (a cluster's or a
    Sentinel's, whose master changes)."""
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if isinstance(kwargs, dict) and "service_name" not in kwargs:
        if "path" in kwargs:
            return f"unix://{kwargs['path']}"
        if "host" in kwargs:
            return f"redis://{kwargs['host']}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
    return f"<{type(client).__module__}.{type(client).__name__}>"


def make_client(url: str, *, socket_timeout: float, shown: str) -> Any:
    """The blocking client for ``url`` (``shown``: the URL without its password).

    Raises:
        ValueError: a URL of none of the forms above, or a malformed one.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
    }
    if scheme in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(url, retry=default_retry(), **timeouts)
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if scheme in ("redis+cluster", "rediss+cluster"):
        nodes = [
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in _hosts(parts.netloc, shown)
        ]
        return RedisCluster(
            startup_nodes=nodes,
            username=user,
            password=password,
            ssl=scheme == "rediss+cluster",
            **timeouts,
        )
    if scheme == "redis+sentinel":
        path = [piece for piece in parts.path.split("/") if piece]
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(
                f"Redis URL {shown!r} must name the service Sentinel watches: "
                "redis+sentinel://host:port,host:port/service (or /service/db)"
            )
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            _hosts(parts.netloc, shown), sentinel_kwargs=dict(timeouts)
        )
        return sentinel.master_for(  # type: ignore[no-untyped-call]
            path[0],
            db=int(path[1]) if len(path) == 2 else 0,
            username=user,
            password=password,
            retry=default_retry(),
            **timeouts,
        )
    raise ValueError(f"Redis URL {shown!r} is not one RedisStore knows: use {FORMS}")
