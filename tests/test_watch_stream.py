"""A tab's change stream over HTTP: ``GET <prefix>/watch`` answered by the ASGI
middleware as Server-Sent Events, driven here as a server would drive it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import Any

import pytest

from statekit import SessionState, StateEngine
from statekit.integrations.asgi import StateKitMiddleware
from statekit.web import SessionGate, change_event


async def app(scope: Any, receive: Any, send: Any) -> None:  # the app's own routes
    raise AssertionError("the stream never reaches the app")


class Request:
    """One request to the middleware: what it sent back, and a way to hang up."""

    def __init__(
        self,
        middleware: StateKitMiddleware,
        query: str,
        headers: dict[str, str],
        method: str = "GET",
    ):
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()
        scope = {
            "type": "http",
            "method": method,
            "path": "/statekit/watch",
            "query_string": query.encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        self.task = asyncio.ensure_future(middleware(scope, self._receive, self._send))

    async def _receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(dict(message))

    def hang_up(self) -> None:
        self._gone.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])

    def events(self) -> list[tuple[str, Any]]:
        found = []
        for block in self.body.decode().split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "event" in lines:
                found.append((lines["event"], json.loads(lines["data"])))
        return found

    async def until(self, check: Callable[[], bool]) -> None:
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not seen: {self.body!r}")


SAME = {"sec-fetch-site": "same-origin"}


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_a_tab_streams_its_own_changes_and_the_chosen_globals() -> None:
    """The stream carries the tab's session's changes and the globals the app chose,
    not another session's nor other globals; it ends with ``event: end`` when the
    session is closed. Fails if the endpoint does not stream, leaks another session's
    change or a global not chosen, or never ends."""

    async def scenario() -> None:
        engine = StateEngine()
        cart: SessionState[list[str]] = engine.session_state("cart", [])
        visitors = engine.global_state("visitors", 0)
        secret = engine.global_state("secret", "")
        middleware = StateKitMiddleware(app, engine, streams=[visitors])
        sid, other = engine.open_session(), engine.open_session()
        request = Request(middleware, f"statekit_session={sid}", SAME)
        await request.until(lambda: bool(request.sent))
        assert request.status == 200
        assert dict(request.sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
        async with engine.aevent(sid) as ev:
            ev[cart].append("apple")
        async with engine.aevent(other) as ev:
            ev[cart].append("not yours")
        await secret.aset("hidden")
        await visitors.aincrement()
        await request.until(lambda: len(request.events()) == 2)
        await engine.aclose_session(sid)
        await asyncio.wait_for(request.task, 5)
        assert request.events() == [
            ("change", {"scope": "session", "state": "cart", "value": ["apple"], "missed": 0}),
            ("change", {"scope": "global", "state": "visitors", "value": 1, "missed": 0}),
            ("end", {"reason": "closed"}),
        ]
        assert sid not in request.body.decode()  # the id is the tab's secret
        assert request.sent[-1]["more_body"] is False

    run(scenario)


def test_a_tab_of_a_signed_in_user_streams_the_users_changes() -> None:
    """With ``user_of``, the stream carries the changes of the request's user's user
    states made from another session, as scope "user"; not another user's. Fails if
    the middleware does not pass the user to the watch (nothing would arrive) or
    mixes users up."""

    async def scenario() -> None:
        engine = StateEngine()
        cart: SessionState[list[str]] = engine.user_state("cart", [])
        middleware = StateKitMiddleware(
            app, engine, user_of=lambda scope: dict(scope["headers"])[b"x-user"].decode()
        )
        tab, phone, other = engine.open_session(), engine.open_session(), engine.open_session()
        request = Request(middleware, f"statekit_session={tab}", {**SAME, "x-user": "alice"})
        await request.until(lambda: bool(request.sent))
        async with engine.aevent(other, user="bob") as ev:
            ev[cart].append("not yours")
        async with engine.aevent(phone, user="alice") as ev:
            ev[cart].append("apple")
        await request.until(lambda: len(request.events()) == 1)
        await engine.aclose_session(tab)
        await asyncio.wait_for(request.task, 5)
        assert request.events() == [
            ("change", {"scope": "user", "state": "cart", "value": ["apple"], "missed": 0}),
            ("end", {"reason": "closed"}),
        ]

    run(scenario)


def test_a_page_that_goes_away_closes_its_watch() -> None:
    """The page hangs up: the request ends and the engine drops its watch (events no
    longer go through it). Fails if a gone page's watch lives on."""

    async def scenario() -> None:
        engine = StateEngine()
        middleware = StateKitMiddleware(app, engine)
        sid = engine.open_session()
        request = Request(middleware, f"statekit_session={sid}", SAME)
        await request.until(lambda: bool(request.sent))
        assert engine._host.leave != engine._entry.leave  # a watch is open
        request.hang_up()
        await asyncio.wait_for(request.task, 5)
        assert engine._host.leave == engine._entry.leave  # none is

    run(scenario)


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("statekit_session=x", {"sec-fetch-site": "cross-site"}, 403),
        ("", SAME, 409),
    ],
)
def test_a_stream_is_refused_to_another_site_and_without_a_session(
    query: str, headers: dict[str, str], status: int
) -> None:
    """Another site's page may not read a tab's changes; a request naming no session
    (or a malformed one) is told so. Fails if either is streamed."""

    async def scenario() -> None:
        request = Request(StateKitMiddleware(app, StateEngine()), query, headers)
        await asyncio.wait_for(request.task, 5)
        assert request.status == status

    run(scenario)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_at_shutdown_a_stream_says_its_session_ended_only_if_it_did(
    store: str, tmp_path: Path
) -> None:
    """An engine shutting down over a store of its process ends its sessions: the
    stream ends with ``end`` and reason ``shutdown``, so the page knows. Over a shared
    store the session lives on: the stream just ends, and the page's EventSource
    reconnects (to the next server). Fails if a shared store's stream told the page
    its session ended (it would open a new one, losing the tab's state)."""
    from statekit import SQLiteStore

    async def scenario() -> None:
        engine = StateEngine(SQLiteStore(tmp_path / "s.db") if store == "sqlite" else None)
        sid = engine.open_session()
        request = Request(StateKitMiddleware(app, engine), f"statekit_session={sid}", SAME)
        await request.until(lambda: bool(request.sent))
        await engine.ashutdown()
        await asyncio.wait_for(request.task, 5)
        expected = [("end", {"reason": "shutdown"})] if store == "memory" else []
        assert request.events() == expected
        assert request.sent[-1]["more_body"] is False

    run(scenario)


def test_head_is_refused_rather_than_streamed() -> None:
    """A HEAD answer has no body, so a stream to one would never end: the connection
    (and its keep-alive requests) and the watch would stay open. Fails if a HEAD opens
    a stream: the request then does not finish."""

    async def scenario() -> None:
        engine = StateEngine()
        sid = engine.open_session()
        request = Request(StateKitMiddleware(app, engine), f"statekit_session={sid}", SAME, "HEAD")
        await asyncio.wait_for(request.task, 5)
        assert request.status == 405
        assert dict(request.sent[0]["headers"])[b"allow"] == b"GET"
        assert request.body == b""

    run(scenario)


@pytest.mark.parametrize("sid", ["a" * 32, "not%20an%20id"])
def test_an_unknown_session_ends_at_once(sid: str) -> None:
    """Fails if a stream of no session waits for changes that will never come."""

    async def scenario() -> None:
        middleware = StateKitMiddleware(app, StateEngine())
        request = Request(middleware, f"statekit_session={sid}", SAME)
        await asyncio.wait_for(request.task, 5)
        assert request.events() == [("end", {"reason": "unknown"})]

    run(scenario)


def test_hosts_that_do_not_stream_say_so_and_streams_are_checked() -> None:
    """A WSGI host's gate answers the stream's path 404 (not_streamed), rather than
    leave the page's EventSource retrying; streams= takes the engine's globals only."""
    engine = StateEngine()
    answer = SessionGate(engine).serve("GET", "/statekit/watch", headers=SAME)
    assert answer is not None
    assert answer.status == 404
    assert b"not_streamed" in answer.body
    with pytest.raises(Exception, match="another StateEngine"):
        SessionGate(engine, streams=[StateEngine().global_state("x", 0)])


def test_a_value_json_cannot_carry_is_left_out_not_the_stream() -> None:
    from statekit import StateChange

    assert change_event(StateChange(sid=None, state="x", value=object())) is None
    good = change_event(StateChange(sid="s", state="n", value=(1, 2), missed=3))
    assert good is not None
    assert json.loads(good.decode().split("data: ", 1)[1]) == {
        "scope": "session",
        "state": "n",
        "value": {"$tuple": [1, 2]},
        "missed": 3,
    }


def test_a_server_given_a_graceful_timeout_stops_with_streams_open(tmp_path: Path) -> None:
    """uvicorn waits for open responses before it runs the app's shutdown, and a change
    stream is open until its page goes away: with ``--timeout-graceful-shutdown`` (as
    the docs say to run it) the server cuts the streams after that time, then the
    engine shuts down and its sessions end with reason ``shutdown``. Fails if a stream
    outlives the cut (the server does not exit) or the engine's shutdown never runs."""
    port = _free_port()
    log = tmp_path / "ended.log"
    log.touch()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(__file__).parent),
            "_stream_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            "1",
            "--log-level",
            "warning",
        ],
        env={**os.environ, "STATEKIT_TEST_LOG": str(log)},
        start_new_session=True,
    )
    stream: socket.socket | None = None
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, "uvicorn exited at start"
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            try:
                opened = _http(
                    port,
                    b"POST /statekit/open HTTP/1.1\r\nhost: x\r\n"
                    b"content-length: 0\r\nconnection: close\r\n\r\n",
                )
                break
            except OSError:
                time.sleep(0.1)
        sid = json.loads(opened.split(b"\r\n\r\n", 1)[1])["sid"]
        stream = socket.create_connection(("127.0.0.1", port), timeout=10)
        stream.sendall(
            f"GET /statekit/watch?statekit_session={sid} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
        )
        received = b""
        while b"retry: 3000" not in received:
            chunk = stream.recv(4096)
            assert chunk, "the stream closed before it began"
            received += chunk
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=20)  # raises TimeoutExpired if a stream holds it
        assert log.read_text().split() == ["shutdown"]
    finally:
        if stream is not None:
            stream.close()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(port: int, request: bytes) -> bytes:
    """One request on a connection of its own; the whole answer (the server closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
