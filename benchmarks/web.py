"""The cost statekit adds to a real request: a Starlette app doing the guide's cart
event per request (add an item to the tab's cart, answer its size), four ways:

- **bare**: the handler keeps carts in a dict of its own, keyed by a header;
- **statekit, memory**: ``StateKitMiddleware`` and an event on the request's visit;
- **raw redis-py GET + SET**: the handler reads the cart's JSON from Redis, adds the
  item and writes it back (asyncio client);
- **statekit, Redis**: as on memory, on a ``RedisStore`` with its asyncio client;
- **statekit, Redis, lease_keep**: the same with ``lease_keep=5``, as an app whose tabs
  come back to the same worker runs it (one worker, sticky sessions): an event on a
  lease the worker kept skips its load (one round trip).

Each is measured twice, in the same run: called in-process as an ASGI app (no
network: the framework's and statekit's own cost), and served by uvicorn on 127.0.0.1
(one worker, a process of its own) to a bounded load generator (keep-alive
connections sending requests one after another: requests/s, p50 and p99 latency).
Rounds are interleaved across the four; the median round is kept. A cart holds at most
20 items (then starts again), so that every request does the same work.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._timing import Measure, Target

TITLE = "a request in a web app (Starlette)"
BASELINE = "bare handler"
VARIANTS = ["bare", "memory", "raw-redis", "redis", "redis-kept"]
NAMES = {
    "bare": "bare handler",
    "memory": "statekit, memory",
    "raw-redis": "raw redis-py GET + SET",
    "redis": "statekit, Redis",
    "redis-kept": "statekit, Redis, lease_keep",
}
TARGETS = [
    Target(NAMES["memory"], NAMES["bare"], "within", 1.05),
    Target(NAMES["redis"], NAMES["raw-redis"], "adds", 1.3, base=NAMES["bare"]),
    Target(NAMES["redis-kept"], NAMES["raw-redis"], "adds", 1.3, base=NAMES["bare"]),
]
ITEM_LIMIT = 20
CONNECTIONS = 8


def make_app(variant: str) -> Any:
    """The app of ``variant`` (uvicorn's factory: ``benchmarks.web:app_<variant>``)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    url = os.environ.get("BENCH_REDIS_URL", "")
    if variant == "bare":
        carts: dict[str, list[str]] = {}

        async def bare(request: Request) -> JSONResponse:
            cart = carts.setdefault(request.headers.get("x-session", ""), [])
            if len(cart) >= ITEM_LIMIT:
                cart.clear()
            cart.append("Milk")
            return JSONResponse({"size": len(cart)})

        return Starlette(routes=[Route("/cart", bare, methods=["POST"])])
    if variant == "raw-redis":
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(url)

        async def raw(request: Request) -> JSONResponse:
            key = "bench:cart:" + request.headers.get("x-session", "")
            found = await client.get(key)
            cart = json.loads(found) if found else []
            if len(cart) >= ITEM_LIMIT:
                cart.clear()
            cart.append("Milk")
            await client.set(key, json.dumps(cart))
            return JSONResponse({"size": len(cart)})

        return Starlette(routes=[Route("/cart", raw, methods=["POST"])])

    from statekit import SessionState, StateEngine
    from statekit.integrations.asgi import StateKitMiddleware, visit_of

    if variant == "memory":
        engine = StateEngine()
    else:
        import redis.asyncio as aioredis

        from statekit.stores.redis import RedisStore

        store = RedisStore(url, prefix=f"web{uuid.uuid4().hex[:6]}")
        store.async_client = aioredis.Redis.from_url(url)
        engine = StateEngine(store, lease_keep=5 if variant == "redis-kept" else 0)
    cart_state: SessionState[list[str]] = engine.session_state("cart", [])

    async def with_statekit(request: Request) -> JSONResponse:
        async with visit_of(request).aevent() as ev:
            cart = ev[cart_state]
            if len(cart) >= ITEM_LIMIT:
                cart.clear()
            cart.append("Milk")
            size = len(cart)
        return JSONResponse({"size": size})

    return Starlette(
        routes=[Route("/cart", with_statekit, methods=["POST"])],
        middleware=[Middleware(StateKitMiddleware, engine=engine)],
    )


def app_bare() -> Any:
    return make_app("bare")


def app_memory() -> Any:
    return make_app("memory")


def app_raw_redis() -> Any:
    return make_app("raw-redis")


def app_redis() -> Any:
    return make_app("redis")


def app_redis_kept() -> Any:
    return make_app("redis-kept")


# -- in-process: the ASGI app called directly ---------------------------------------


async def _call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """One request to ``app``, in-process; the response's body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    body: list[bytes] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    return b"".join(body)


async def _session_headers(
    variant: str, request: Callable[[str, str, list[tuple[bytes, bytes]]], Awaitable[bytes]]
) -> list[tuple[bytes, bytes]]:
    """The headers a tab sends: its session's (opened as statekit.js opens it)."""
    if variant in ("bare", "raw-redis"):
        return [(b"x-session", uuid.uuid4().hex.encode())]
    opened = await request("POST", "/statekit/open", [(b"sec-fetch-site", b"same-origin")])
    return [(b"x-statekit-session", json.loads(opened)["sid"].encode())]


def in_process(apps: dict[str, Any], requests: int, rounds: int) -> list[Measure]:
    """Seconds per request of each app, called in-process; median of interleaved
    rounds."""

    async def main() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {variant: [] for variant in apps}
        headers = {}
        for variant, app in apps.items():
            headers[variant] = await _session_headers(variant, functools.partial(_call, app))
        for _ in range(rounds):
            for variant, app in apps.items():
                start = time.perf_counter()
                for _ in range(requests):
                    await _call(app, "POST", "/cart", headers[variant])
                times[variant].append((time.perf_counter() - start) / requests)
        return times

    times = asyncio.run(main())
    return [Measure(name=NAMES[v], per_op=statistics.median(t)) for v, t in times.items()]


# -- over loopback: uvicorn and a load generator ------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(variant: str, redis_url: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start uvicorn (one worker) serving ``variant`` on 127.0.0.1; its process and
    port, once it answers."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            f"benchmarks.web:app_{variant.replace('-', '_')}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, "BENCH_REDIS_URL": redis_url},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"uvicorn serving {variant} did not start")


async def _http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
) -> bytes:
    """One request on a keep-alive connection; the response's body."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: 127.0.0.1", b"content-length: 0"]
    lines += [name + b": " + value for name, value in headers]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


def over_loopback(
    ports: dict[str, int], requests: int, rounds: int
) -> tuple[list[Measure], dict[str, tuple[float, float, float]]]:
    """Seconds per request (wall time over all connections) of each server, and its
    requests/s, p50 and p99 latency; median of interleaved rounds."""

    async def load(variant: str, port: int) -> tuple[float, list[float]]:
        connections = []
        for _ in range(CONNECTIONS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            headers = await _session_headers(variant, functools.partial(_http, reader, writer))
            connections.append((reader, writer, headers))
        latencies: list[float] = []

        async def one(reader: Any, writer: Any, headers: Any) -> None:
            for _ in range(requests // CONNECTIONS):
                start = time.perf_counter()
                await _http(reader, writer, "POST", "/cart", headers)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(one(*c) for c in connections))
        wall = time.perf_counter() - start
        for _, writer, _ in connections:
            writer.close()
        return wall / len(latencies), latencies

    results: dict[str, list[tuple[float, list[float]]]] = {v: [] for v in ports}
    for _ in range(rounds):
        for variant, port in ports.items():
            results[variant].append(asyncio.run(load(variant, port)))
    measures, figures = [], {}
    for variant, runs in results.items():
        runs.sort(key=lambda run: run[0])
        per_request, latencies = runs[len(runs) // 2]
        latencies.sort()
        figures[variant] = (
            1 / per_request,
            latencies[len(latencies) // 2],
            latencies[int(len(latencies) * 0.99)],
        )
        measures.append(Measure(name=NAMES[variant], per_op=per_request))
    return measures, figures


def run(quick: bool = False) -> list[tuple[str, list[Measure]]]:
    from statekit.testing import RedisServer

    server = RedisServer().start()
    os.environ["BENCH_REDIS_URL"] = server.url
    started: list[subprocess.Popen[bytes]] = []
    try:
        apps = {variant: make_app(variant) for variant in VARIANTS}
        inproc = in_process(apps, requests=300 if quick else 2000, rounds=3 if quick else 9)
        ports = {}
        for variant in VARIANTS:
            process, ports[variant] = serve(variant, server.url)
            started.append(process)
        loopback, figures = over_loopback(
            ports, requests=400 if quick else 4000, rounds=3 if quick else 7
        )
    finally:
        for process in started:
            process.terminate()
            process.wait(10)
        server.stop()
    for variant, (rps, p50, p99) in figures.items():
        print(
            f"  {NAMES[variant]:<26} {rps:>8,.0f} requests/s   p50 {p50 * 1e3:6.2f} ms"
            f"   p99 {p99 * 1e3:6.2f} ms",
            file=sys.stderr,
        )
    plot(inproc, loopback)
    return [("in-process ASGI (no network)", inproc), ("uvicorn on 127.0.0.1", loopback)]


def plot(inproc: list[Measure], loopback: list[Measure]) -> None:
    """Time per request of each variant, in-process and under uvicorn:
    ``benchmarks/results/web.png`` (with matplotlib, in the ``bench`` extra)."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
    except ImportError:
        return
    matplotlib.use("Agg")
    pyplot: Any = importlib.import_module("matplotlib.pyplot")
    from .scaling import RESULTS

    names = [NAMES[v] for v in VARIANTS]
    figure, axes = pyplot.subplots(figsize=(8.4, 4.2))
    width = 0.38
    for offset, (label, measures) in enumerate(
        (("in-process ASGI", inproc), ("uvicorn on 127.0.0.1", loopback))
    ):
        times = {m.name: (m.per_op or 0.0) * 1e6 for m in measures}
        xs = [i + (offset - 0.5) * width for i in range(len(names))]
        axes.bar(xs, [times[name] for name in names], width, label=label)
    axes.set_xticks(range(len(names)), names, rotation=15, ha="right")
    axes.set_ylabel("µs per request")
    axes.set_title("A cart request in a Starlette app")
    axes.grid(True, axis="y", alpha=0.3)
    axes.legend()
    RESULTS.mkdir(exist_ok=True)
    figure.tight_layout()
    figure.savefig(RESULTS / "web.png", dpi=110)
    pyplot.close(figure)
