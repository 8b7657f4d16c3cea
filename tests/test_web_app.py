"""The demo web app over HTTP (Starlette's test client), as statekit.js drives it: each
tab opens its own session at ``/statekit/open`` and names it in ``X-Statekit-Session``;
browser tokens go out in ``X-Statekit-Browser`` and come back in
``X-Statekit-Browser-Set``."""

from __future__ import annotations

import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from statekit import BrowserKeys
from statekit.web import BROWSER_HEADER, BROWSER_SET_HEADER, ENDED_HEADER, SESSION_HEADER

APP = runpy.run_path(str(Path(__file__).resolve().parent.parent / "docs/examples/web_app.py"))
SECRET = "w" * 32


@pytest.fixture
def app() -> Iterator[TestClient]:
    with TestClient(APP["build_app"](BrowserKeys([SECRET]))) as client:
        yield client


class Tab:
    """One tab of a browser, as statekit.js behaves: a session of its own, the
    browser's tokens (shared by every tab of it) sent and kept."""

    def __init__(self, client: TestClient, storage: dict[str, str]) -> None:
        self.client = client
        self.storage = storage
        opened = client.post("/statekit/open")
        assert opened.status_code == 200
        self.sid: str = opened.json()["sid"]

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.client.post(
            path,
            json=body or {},
            headers={SESSION_HEADER: self.sid, BROWSER_HEADER: json.dumps(self.storage)},
        )
        for key, token in json.loads(response.headers.get(BROWSER_SET_HEADER, "{}")).items():
            if token is None:
                self.storage.pop(key, None)
            else:
                self.storage[key] = token
        return response

    def load(self) -> dict[str, Any]:
        response = self.post("/api/load")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def close(self) -> None:
        assert self.client.post("/statekit/close", content=self.sid).status_code == 204


def test_each_tab_has_its_own_cart_and_counter_and_shares_the_visitor_count(
    app: TestClient,
) -> None:
    # Fails if tabs share a session (one cart per browser) or visits are not global.
    storage: dict[str, str] = {}
    one, two = Tab(app, storage), Tab(app, storage)
    assert one.sid != two.sid
    first = one.load()
    assert (first["visitors"], first["cart"], first["counter"]) == (1, [], 0)
    assert two.load()["visitors"] == 2
    added = one.post("/api/cart", {"items": ["Milk", "Water"]}).json()
    assert added == {"cart": ["Milk", "Water"], "cart_size": 2}
    assert one.post("/api/counter").json() == {"counter": 1}
    assert one.post("/api/counter").json() == {"counter": 2}
    second = two.load()
    assert (second["cart"], second["counter"], second["visitors"]) == ([], 0, 3)
    assert app.get("/api/status").json() == {"visitors": 3, "tabs": 2}


def test_a_refresh_is_a_new_session(app: TestClient) -> None:
    # Fails if a reload found the old tab's cart: the page keeps its id in memory only.
    storage: dict[str, str] = {}
    before = Tab(app, storage)
    before.post("/api/cart", {"items": ["Cereal"]})
    after = Tab(app, storage)  # the reloaded page opens a session again
    assert after.load()["cart"] == []
    assert before.load()["cart"] == ["Cereal"]


def test_credentials_are_kept_encrypted_in_the_browser_and_shared_by_its_tabs() -> None:
    # Fails if the password travels in clear, if another tab cannot read it, or if
    # the same secret after a restart (a new app) cannot.
    storage: dict[str, str] = {}
    with TestClient(APP["build_app"](BrowserKeys([SECRET]))) as app:
        one, two = Tab(app, storage), Tab(app, storage)
        saved = one.post("/api/credentials", {"username": "ann", "password": "hunter2"})
        assert saved.json() == {"saved": True}
        assert set(storage) == {"login"}
        assert "hunter2" not in storage["login"]
        assert SECRET not in saved.text
        assert (two.load()["username"], two.load()["password"]) == ("ann", "hunter2")
    with TestClient(APP["build_app"](BrowserKeys([SECRET]))) as restarted:
        data = Tab(restarted, storage).load()
        assert (data["username"], data["password"], data["secrets"]) == (
            "ann",
            "hunter2",
            "configured",
        )
    with TestClient(APP["build_app"](BrowserKeys(["another-secret-" + "x" * 20]))) as other:
        assert Tab(other, storage).load()["username"] == ""  # unreadable: the default


def test_foreign_or_garbage_tokens_give_defaults_not_errors(app: TestClient) -> None:
    # Fails if a bad token from the browser becomes an error page.
    sid = app.post("/statekit/open").json()["sid"]
    for header in ['{"login": "sk1.AAAA.BBBB.CCCC"}', "not json", "[1, 2]", '{"login": 5}']:
        response = app.post("/api/load", headers={SESSION_HEADER: sid, BROWSER_HEADER: header})
        assert response.status_code == 200
        assert (response.json()["username"], response.json()["password"]) == ("", "")


@pytest.mark.parametrize("path", ["/api/load", "/api/cart", "/api/counter", "/api/credentials"])
@pytest.mark.parametrize(("sid", "reason"), [(None, "missing"), ("forged-id", "unknown")])
def test_requests_without_a_live_session_are_told_it_ended(
    app: TestClient, path: str, sid: str | None, reason: str
) -> None:
    # Fails if such a request is served, or answered without the header the page reads.
    headers = {SESSION_HEADER: sid} if sid else {}
    response = app.post(path, json={"items": ["Milk"]}, headers=headers)
    assert response.status_code == 409
    assert response.headers[ENDED_HEADER] == reason
    assert response.json()["error"] == "session_ended"


def test_closing_a_tab_ends_only_its_session(app: TestClient) -> None:
    # Fails if the close beacon ended another tab's session, or left the tab's object.
    storage: dict[str, str] = {}
    closing, staying = Tab(app, storage), Tab(app, storage)
    closing.post("/api/counter")
    closing.close()
    gone = closing.post("/api/counter")
    assert gone.status_code == 409  # its object went with its session
    assert gone.headers[ENDED_HEADER] == "closed"  # mapped by the integration: the page was closed
    assert staying.post("/api/counter").json() == {"counter": 1}
    assert staying.post("/api/cart", {"items": ["Water"]}).status_code == 200
    assert app.get("/api/status").json()["tabs"] == 1
    closing.close()  # a second beacon for the same tab is no error


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/api/cart", {"items": []}, "tick at least one item"),
        ("/api/cart", {"items": ["Milk", "Nope"]}, "unknown item 'Nope'"),
        ("/api/credentials", {"username": "ann", "password": 5}, "a username and a password"),
        ("/api/credentials", {"username": "a" * 201}, "200 or fewer"),
    ],
)
def test_bad_input_is_answered_400_with_what_to_do(
    app: TestClient, path: str, body: dict[str, Any], detail: str
) -> None:
    # Fails if bad input is accepted, or answered without a message the page can show.
    tab = Tab(app, {})
    response = tab.post(path, body)
    assert response.status_code == 400
    assert detail in response.json()["detail"]
    assert tab.load()["cart"] == []


def test_the_page_and_the_helper_are_served(app: TestClient) -> None:
    # Fails if the page does not load statekit.js from the integration, or says
    # nothing of what to try.
    page = app.get("/").text
    assert "statekit demo" in page
    assert '<script src="/statekit/statekit.js"></script>' in page
    assert "StateKit.start" in page
    for hint in ("second tab", "Reload", "Restart the server", "STATEKIT_SECRETS"):
        assert hint in page
    script = app.get("/statekit/statekit.js")
    assert script.status_code == 200
    assert "StateKit" in script.text
    assert BROWSER_SET_HEADER in script.text


def test_without_secrets_the_ephemeral_key_is_information_not_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fails if the default path warns (pytest turns warnings into errors here) or does
    # not tell that browser values will not survive a restart.
    monkeypatch.delenv("STATEKIT_SECRETS", raising=False)
    with caplog.at_level(logging.INFO, logger="statekit.demo"):
        app = APP["build_app"]()
    said = [r for r in caplog.records if r.name == "statekit.demo"]
    assert [r.levelno for r in said] == [logging.INFO]
    assert "will not survive a restart" in said[0].getMessage()
    with TestClient(app) as client:
        assert Tab(client, {}).load()["secrets"] == "ephemeral"


def test_secrets_from_the_environment_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fails if STATEKIT_SECRETS is ignored: a token made under it must read back.
    monkeypatch.setenv("STATEKIT_SECRETS", SECRET)
    storage: dict[str, str] = {}
    with TestClient(APP["build_app"]()) as client:
        Tab(client, storage).post("/api/credentials", {"username": "bo", "password": "pw"})
    with TestClient(APP["build_app"](BrowserKeys([SECRET]))) as client:
        data = Tab(client, storage).load()
        assert (data["username"], data["secrets"]) == ("bo", "configured")


ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(command: list[str], port: int) -> subprocess.Popen[str]:
    """A demo server in a process of its own, once it accepts connections."""
    env = {k: v for k, v in os.environ.items() if k != "STATEKIT_SECRETS"}
    process = subprocess.Popen(
        [sys.executable, *command, "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the demo did not start: {process.communicate(timeout=10)[0]}")


DEMO = ["docs/examples/web_app.py"]
# dev.py's demo command, its install step left out (the test's environment has it).
DEV_DEMO = ["-c", "import sys, dev; dev.ensure_env = lambda *a: None; dev.demo(sys.argv[1:])"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("command", [DEMO, DEV_DEMO], ids=["web_app.py", "dev.py-demo"])
def test_the_demo_server_stops_quietly_on_sigterm_as_on_ctrl_c(
    command: list[str], sig: int
) -> None:
    # Fails if a stop signal leaves the server running, ends it with an error code or
    # a traceback, or if the default path (no STATEKIT_SECRETS) prints a warning.
    port = _free_port()
    process = _serve(command, port)
    try:
        process.send_signal(sig)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "arning" not in output
    assert "will not survive a restart" in output  # said, as information
    with pytest.raises(ConnectionRefusedError):  # and nothing serves the port any more
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
