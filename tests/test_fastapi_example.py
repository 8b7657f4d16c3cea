"""The FastAPI shop example (docs/examples/fastapi_shop.py): driven as a browser with
tabs would drive it (statekit.testing.Browser over FastAPI's test client), and served by
uvicorn with two worker processes on Redis to two concurrent clients."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from statekit import BrowserKeys, StateEngine
from statekit.testing import Browser, FakeClock, RedisServer

if TYPE_CHECKING:
    from shop import Shop

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"
SECRET = "fastapi-example-secret-of-32-chars!"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The example's module, imported as uvicorn imports it (with secrets set: without
    them its module-level app would warn that browser values die with the process)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("STATEKIT_SECRETS", SECRET)
    monkeypatch.delenv("STATEKIT_REDIS_URL", raising=False)
    monkeypatch.delenv("STATEKIT_SQLITE_PATH", raising=False)
    return importlib.import_module("fastapi_shop")


@pytest.fixture
def make_shop(example: Any) -> Callable[[], Shop]:
    shop_module = importlib.import_module("shop")
    return lambda: shop_module.Shop(StateEngine(app="shop"), BrowserKeys([SECRET]))


@pytest.fixture
def shop(make_shop: Callable[[], Shop]) -> Shop:
    return make_shop()


@pytest.fixture
def client(example: Any, shop: Shop) -> Iterator[TestClient]:
    app: FastAPI = example.build_app(shop)
    with TestClient(app) as c:
        yield c


def test_two_tabs_have_independent_carts_and_share_the_counter(client: TestClient) -> None:
    """One browser, two tabs (no cookie): each tab's cart is its own; the visit counter
    is everyone's."""
    browser = Browser(client, keys=["login"])
    one, two = browser.open(), browser.open()
    assert one.sid != two.sid
    assert one.post("/api/visit").json()["visits"] == 1
    assert two.post("/api/visit").json()["visits"] == 2
    one.post("/api/cart", json={"item": "Milk"})
    two.post("/api/cart", json={"item": "Water"})
    assert one.post("/api/cart", json={"item": "Cereal"}).json()["cart"] == ["Milk", "Cereal"]
    shown = two.post("/api/visit").json()
    assert (shown["cart"], shown["cart_size"], shown["visits"]) == (["Water"], 1, 3)
    assert "set-cookie" not in {k.lower() for k in one.post("/api/visit").headers}


def test_closing_one_tab_leaves_the_other_working(client: TestClient, shop: Shop) -> None:
    browser = Browser(client)
    one, two = browser.open(), browser.open()
    one.post("/api/cart", json={"item": "Milk"})
    two.post("/api/cart", json={"item": "Water"})
    two.close()
    assert shop.engine.close_session(two.sid) is False  # its beacon closed it
    after = one.post("/api/cart", json={"item": "Milk"})
    assert after.status == 200
    assert after.json()["cart"] == ["Milk", "Milk"]
    assert one.ended is None
    assert shop.engine.close_session(one.sid) is True  # still open until now


def test_a_reload_is_a_new_session_with_an_empty_cart(client: TestClient) -> None:
    browser = Browser(client)
    tab = browser.open()
    tab.post("/api/cart", json={"item": "Milk"})
    first = tab.sid
    tab.reload()
    assert tab.sid != first
    assert tab.post("/api/visit").json()["cart"] == []


def test_the_username_is_shared_by_the_tabs_and_survives_a_restart(
    example: Any, make_shop: Callable[[], Shop]
) -> None:
    with TestClient(example.build_app(make_shop())) as first_run:
        browser = Browser(first_run, keys=["login"])
        one = browser.open()
        assert one.post("/api/login", json={"username": " ann "}).json()["user"] == "ann"
        assert browser.open().post("/api/visit").json()["user"] == "ann"
    with TestClient(example.build_app(make_shop())) as second_run:
        browser.restart(second_run)
        assert browser.open().post("/api/visit").json()["user"] == "ann"
        assert one.post("/api/visit").status == 409  # its session died with the server
        assert one.ended == "unknown"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/api/cart", {"item": "Nope"}, "unknown item 'Nope'"),
        ("/api/cart", {}, "unknown item None"),
        ("/api/login", {"username": ""}, "a username is 1 to 40 characters"),
        ("/api/login", {"username": 5}, "a username is 1 to 40 characters"),
    ],
)
def test_a_bad_value_is_400_with_the_message(
    client: TestClient, path: str, body: dict[str, Any], message: str
) -> None:
    tab = Browser(client).open()
    answer = tab.post(path, json=body)
    assert answer.status == 400
    assert answer.json()["detail"].startswith(message)
    assert tab.post("/api/visit").json()["cart"] == []  # the failed event left nothing


def test_a_request_without_a_session_is_told_so(client: TestClient) -> None:
    answer = client.post("/api/cart", json={"item": "Milk"})
    assert answer.status_code == 409
    assert answer.headers["x-statekit-session-ended"] == "missing"


def test_the_page_loads_statekit_js(client: TestClient) -> None:
    page = client.get("/", headers={"accept": "text/html"})
    assert page.status_code == 200
    assert '<script src="/statekit/statekit.js">' in page.text
    assert client.get("/statekit/statekit.js").status_code == 200


# -- two workers on Redis ---------------------------------------------------------------

ACTIONS = 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Client(threading.Thread):
    """A client of its own session: ``ACTIONS`` cart adds, each followed by a visit,
    every request on a new connection (so that either worker may take it)."""

    def __init__(self, base: str, item: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.item = item
        self.workers: Counter[str] = Counter()
        self.sizes: list[int] = []
        self.cart: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            limits = httpx2.Limits(max_keepalive_connections=0)
            with httpx2.Client(base_url=self.base, limits=limits, timeout=10) as http:
                sid = self.call(http, "/statekit/open")["sid"]
                for _ in range(ACTIONS):
                    self.sizes.append(
                        len(self.call(http, "/api/cart", sid, item=self.item)["cart"])
                    )
                    self.call(http, "/api/visit", sid)
                self.cart = self.call(http, "/api/visit", sid)["cart"]
        except BaseException as exc:
            self.error = exc

    def call(self, http: httpx2.Client, path: str, sid: str = "", **body: Any) -> Any:
        headers = {"X-Statekit-Session": sid} if sid else {}
        response = http.post(path, json=body, headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text)
        self.workers[response.headers["x-worker"]] += 1
        return response.json()


def test_two_workers_on_redis_serve_two_clients_exactly(tmp_path: Path) -> None:
    """uvicorn with two worker processes, one Redis: two clients at once, each with its
    own session, 200 adds and 200 visits each. Every add sees the cart it left, whichever
    worker takes it; each cart ends with exactly its 200 items; the visit counter loses
    no increment; and each client's session was served by both workers."""
    redis = RedisServer().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "STATEKIT_REDIS_URL": redis.url,
        "STATEKIT_SECRETS": SECRET,
        "STATEKIT_EXAMPLE_PID_HEADER": "1",
    }
    env.pop("STATEKIT_SQLITE_PATH", None)
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(EXAMPLES),
        "fastapi_shop:app",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        ready = wait_for_two_workers(base, server, log)
        clients = [Client(base, "Milk"), Client(base, "Water")]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=120)
            assert not c.is_alive(), "a client did not finish in 120 s"
            assert c.error is None, repr(c.error)
        for c in clients:
            assert c.sizes == list(range(1, ACTIONS + 1))  # no add lost or seen twice
            assert c.cart == [c.item] * ACTIONS
            assert set(c.workers) == ready, c.workers  # both workers served the session
            assert min(c.workers.values()) >= 1
        with httpx2.Client(base_url=base, timeout=10) as http:
            sid = http.post("/statekit/open").json()["sid"]
            last = http.post("/api/visit", headers={"X-Statekit-Session": sid}).json()
        assert last["visits"] == 2 * (ACTIONS + 1) + 1
    finally:
        stop(server)
        redis.stop()


def wait_for_two_workers(base: str, server: subprocess.Popen[bytes], log: Path) -> set[str]:
    """The pids of the two workers, once each has answered (at most 60 s)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    limits = httpx2.Limits(max_keepalive_connections=0)
    with httpx2.Client(base_url=base, limits=limits, timeout=2) as http:
        while len(seen) < 2:
            if server.poll() is not None:
                raise AssertionError(f"uvicorn exited: {log.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"two workers did not answer in 60 s: {seen}"
            try:
                response = http.get("/statekit/statekit.js")
            except httpx2.TransportError:
                time.sleep(0.1)
                continue
            seen.add(response.headers["x-worker"])
    return seen


def stop(server: subprocess.Popen[bytes]) -> None:
    """Stop uvicorn (by its pid; it stops its workers), or kill its process group."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # a worker its master left behind
        os.killpg(server.pid, signal.SIGKILL)


def test_the_script_serves_the_shop_on_the_port_it_is_given(tmp_path: Path) -> None:
    """``python docs/examples/fastapi_shop.py --port N`` serves the page on loopback."""
    port = free_port()
    env = {**os.environ, "STATEKIT_SECRETS": SECRET}
    env.pop("STATEKIT_REDIS_URL", None)
    log = tmp_path / "script.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "fastapi_shop.py"), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        with httpx2.Client(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            while True:
                assert server.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the script did not serve in 30 s"
                try:
                    page = http.get("/")
                    break
                except httpx2.TransportError:
                    time.sleep(0.1)
            assert page.status_code == 200
            assert "statekit shop" in page.text
            sid = http.post("/statekit/open").json()["sid"]
            added = http.post(
                "/api/cart", json={"item": "Milk"}, headers={"X-Statekit-Session": sid}
            )
            assert added.json()["cart"] == ["Milk"]
    finally:
        stop(server)


def test_a_request_whose_session_ended_counts_no_visit(example: Any) -> None:
    """The shop counts a visit inside its event, once the session was checked: a tab
    idle past its ttl, or a request naming no session, is answered 409 and adds nothing
    to the counter. Counting before the event would make the last visit 3, not 1."""
    clock = FakeClock()
    shop_module = importlib.import_module("shop")
    engine = StateEngine(app="shop", clock=clock, idle_ttl=60)
    with TestClient(example.build_app(shop_module.Shop(engine, BrowserKeys([SECRET])))) as c:
        idle = c.post("/statekit/open").json()["sid"]
        clock.advance(61)
        gone = c.post("/api/visit", headers={"X-Statekit-Session": idle})
        assert (gone.status_code, gone.headers["x-statekit-session-ended"]) == (409, "idle")
        assert c.post("/api/visit").status_code == 409
        live = c.post("/statekit/open").json()["sid"]
        counted = c.post("/api/visit", headers={"X-Statekit-Session": live})
        assert counted.json()["visits"] == 1


def test_the_shop_answers_an_ended_session_409_despite_an_apps_keyerror_handler(
    example: Any, shop: Shop
) -> None:
    """The example wires statekit with ``install``: a handler of the app's own for
    ``KeyError`` (which ``SessionNotFound`` is) does not turn an ended session into its
    404."""
    app: FastAPI = example.build_app(shop)

    async def not_found(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "not found"}, status_code=404)

    app.add_exception_handler(KeyError, not_found)
    with TestClient(app) as c:
        unknown = c.post("/api/visit", headers={"X-Statekit-Session": "gone-" + "x" * 27})
        assert (unknown.status_code, unknown.headers["x-statekit-session-ended"]) == (
            409,
            "unknown",
        )
