"""The demo in a real browser: Debian's Chromium driven by Playwright, against the demo
served on 127.0.0.1 by uvicorn in a process this test starts, stops and restarts.

A missing Chromium fails these tests (``dev.py test`` installs it); they never skip.
The server and browser helpers here are shared with ``test_tabs_e2e.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SECRET = "browser-test-secret-" + "x" * 20
NEW = "rotated-in-secret-" + "y" * 20
UNRELATED = "unrelated-secret-" + "z" * 20
ARTIFACTS = ROOT / "test-artifacts"
#: What uvicorn's access log says when a tab's close beacon was answered.
CLOSE_SEEN = '"POST /statekit/close HTTP/1.1" 204'
#: The longest any single wait of these tests lasts, in milliseconds.
WAIT_MS = 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """An example app served by uvicorn in its own process (access log on), restartable
    on the same port; what it prints is kept, to wait for what it saw.

    Args:
        target: uvicorn's ``module:attribute`` in docs/examples.
        factory: whether the attribute is a function that makes the app.
    """

    def __init__(self, target: str, *, factory: bool = False) -> None:
        self.target = target
        self.factory = factory
        self.port = free_port()
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, secrets: str, env: dict[str, str] | None = None) -> None:
        """Start it with ``STATEKIT_SECRETS=secrets`` and ``env`` (no other STATEKIT_
        variable of this process's)."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("STATEKIT_")}
        environment.update(env or {}, STATEKIT_SECRETS=secrets, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES)]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        command += [*(["--factory"] if self.factory else []), self.target]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the server did not start:\n" + "".join(self.lines))

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()

    def count(self, text: str) -> int:
        """How many lines it printed so far hold ``text``."""
        with self._seen:
            return sum(text in line for line in self.lines)

    def wait_for(self, text: str, count: int, timeout: float = WAIT_MS / 1000) -> None:
        """Wait until ``count`` lines it printed hold ``text``."""
        with self._seen:
            if not self._seen.wait_for(lambda: self.count(text) >= count, timeout):
                raise AssertionError(
                    f"the server printed {text!r} {self.count(text)} times, not {count}:\n"
                    + "".join(self.lines[-20:])
                )

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM), killing it if it does not stop."""
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        if process.stdout is not None:
            process.stdout.close()


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless; fails (never skips) when it is not installed."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield launched
        finally:
            launched.close()


class Tabs:
    """Tabs (pages) of one browser context: one browser, one ``localStorage``. Errors
    thrown on a page are collected; pages are screenshotted when the test failed."""

    def __init__(self, browser: Browser) -> None:
        self.context: BrowserContext = browser.new_context()
        self.context.set_default_timeout(WAIT_MS)
        self.pages: list[Page] = []
        self.errors: list[str] = []

    def open(self, url: str) -> Page:
        page = self.context.new_page()
        self.pages.append(page)
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.goto(url)
        wait_ready(page)
        return page

    def finish(self, request: pytest.FixtureRequest) -> None:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            for i, page in enumerate(self.pages):
                if not page.is_closed():
                    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{i}.png"))
        self.context.close()


def wait_ready(page: Page) -> None:
    page.wait_for_selector("body[data-ready=yes]")


def reload(page: Page) -> None:
    page.evaluate("delete document.body.dataset.ready")
    page.reload()
    wait_ready(page)


# -- the demo ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def server() -> Iterator[Server]:
    demo = Server("web_app:build_app", factory=True)
    try:
        demo.start(SECRET)
        yield demo
    finally:
        demo.stop()


@pytest.fixture
def tabs(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Tabs]:
    opened = Tabs(browser)
    try:
        yield opened
    finally:
        opened.finish(request)
    assert opened.errors == []


def credentials(page: Page) -> tuple[str, str]:
    return page.input_value("#username"), page.input_value("#password")


def save(page: Page, username: str, password: str) -> None:
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#save")
    page.wait_for_selector("#saved:has-text('Saved')")


def test_credentials_survive_reload_restart_and_rotation(server: Server, tabs: Tabs) -> None:
    # Fails if the password is kept in clear, or a reload, a restart with the same
    # secret or a rotation (old secret second) loses it; or if an unrelated secret
    # shows anything but the defaults, or an error.
    page = tabs.open(server.url)
    save(page, "ann", "correct horse battery")
    stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert "correct horse battery" not in stored  # never in plain text
    assert "ann" not in stored
    assert stored.count("sk1.") == 1  # one encrypted token

    reload(page)
    assert credentials(page) == ("ann", "correct horse battery")

    for secrets in (SECRET, f"{NEW},{SECRET}"):  # a restart; then a rotation
        server.stop()
        server.start(secrets)
        reload(page)
        assert credentials(page) == ("ann", "correct horse battery")

    server.stop()
    server.start(UNRELATED)  # an unrelated secret: defaults, and no error on the page
    reload(page)
    assert credentials(page) == ("", "")
    assert page.text_content("#error") == ""


def test_an_ended_session_is_shown_and_a_reload_starts_a_new_one(
    server: Server, tabs: Tabs
) -> None:
    # Fails if a request of a session the server no longer knows fails silently, or
    # if the page's reload button does not give the tab a working session again.
    page = tabs.open(server.url)
    assert page.is_hidden("#ended")
    before = page.evaluate("kit.sid")
    server.stop()
    server.start(SECRET)  # the memory store forgot every session
    page.click("#increment")
    page.wait_for_selector("#ended:not([hidden])")
    assert "session has ended (unknown)" in (page.text_content("#ended-text") or "")
    page.evaluate("delete document.body.dataset.ready")
    page.click("#reload")
    wait_ready(page)
    assert page.is_hidden("#ended")
    assert page.evaluate("kit.sid") != before
    page.click("#increment")
    page.wait_for_selector("#counter:has-text('1')")


def test_the_page_says_when_the_server_is_down_and_what_to_try(server: Server, tabs: Tabs) -> None:
    # Fails if the page does not say what to try, what the server's secrets mean for
    # the browser's values, or that the server cannot be reached.
    page = tabs.open(server.url)
    hints = page.text_content("body") or ""
    assert "Open this page in a second tab" in hints
    assert "has STATEKIT_SECRETS set: the username and password survive a restart" in hints
    assert page.text_content("#tabs") == "1"
    server.stop()
    page.click("#increment")
    page.wait_for_selector("#error:has-text('cannot be reached')")


FORM_SUBMITTED = """() => new Promise((resolve) => {
  const form = document.createElement("form");
  form.innerHTML = '<input type="hidden" name="statekit_session">';
  document.body.appendChild(form);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    resolve(form.elements.statekit_session.value);
  });
  form.requestSubmit();
})"""

#: The real htmx (htmx 2, Zero-Clause BSD), put on the demo's page by the test.
HTMX = (Path(__file__).parent / "vendor" / "htmx.min.js").read_text(encoding="utf-8")

HTMX_REQUEST = """() => new Promise((resolve) => {
  document.body.addEventListener("htmx:afterRequest", (event) =>
    resolve(event.detail.xhr.status), { once: true });
  htmx.ajax("GET", "/api/status", { source: document.body, swap: "none" });
})"""

HTMX_ENDED = """() => new Promise((resolve) => {
  addEventListener("statekit:ended", (event) => resolve(event.detail.reason), { once: true });
  fetch("/statekit/close", { method: "POST", body: kit.sid }).then(() =>
    htmx.ajax("POST", "/api/counter", { source: document.body, swap: "none" }));
})"""

BACK_FORWARD_CACHE = """() => new Promise((resolve) => {
  addEventListener("statekit:opened", (event) => resolve(event.detail.sid), { once: true });
  dispatchEvent(new PageTransitionEvent("pagehide", { persisted: true }));
  dispatchEvent(new PageTransitionEvent("pageshow", { persisted: true }));
})"""


def test_statekit_js_carries_the_session_in_forms_and_htmx_and_opens_anew(
    server: Server, tabs: Tabs
) -> None:
    # Fails if a form's hidden field is not filled with the tab's session, if a real
    # htmx request to this origin lacks the headers, if an htmx answer's ended session
    # is not dispatched (other origins: test_statekit_js.py), if a page back from the
    # back/forward cache (simulated: real pagehide/pageshow events with persisted) does
    # not close its session and open another, or if kit.reopen() does not give a
    # working one.
    page = tabs.open(server.url)
    sid = page.evaluate("kit.sid")
    assert page.evaluate(FORM_SUBMITTED) == sid

    page.add_script_tag(content=HTMX)
    with page.expect_request("**/api/status") as sent:
        assert page.evaluate(HTMX_REQUEST) == 200
    assert sent.value.headers["x-statekit-session"] == sid
    assert sent.value.headers["x-statekit-browser"] == "{}"
    ended = page.evaluate(HTMX_ENDED)  # the session closed behind the page's back
    assert ended == "closed"
    assert page.evaluate("kit.ended") == ended

    closes = server.count(CLOSE_SEEN)
    restored = page.evaluate(BACK_FORWARD_CACHE)
    server.wait_for(CLOSE_SEEN, closes + 1)  # the hidden page closed its session
    assert restored not in (None, sid)
    assert page.evaluate("kit.ended") is None

    reopened = page.evaluate("kit.reopen().then((kit) => kit.sid)")
    assert reopened not in (sid, restored)
    page.click("#increment")  # the demo made the new session's object when it opened
    page.wait_for_selector("#counter:has-text('1')")
    assert page.text_content("#error") == ""


def test_the_older_token_helper_still_works(server: Server, tabs: Tabs) -> None:
    # Fails if StateKit.create({keys}) no longer sends the stored tokens of its keys
    # (and only those) or no longer stores the tokens an answer carries.
    page = tabs.open(server.url)
    page.evaluate("localStorage.setItem('statekit:other', 'not mine')")
    save(page, "ann", "pw")
    token = page.evaluate("localStorage.getItem('statekit:login')")
    with page.expect_request("**/api/status") as sent:
        page.evaluate("StateKit.create({ keys: ['login'] }).fetch('/api/status')")
    assert sent.value.headers["x-statekit-browser"] == json.dumps(
        {"login": token}, separators=(",", ":")
    )
    page.evaluate("localStorage.removeItem('statekit:login')")
    kept = page.evaluate("""async () => {
      const state = StateKit.create({ keys: ["login"] });
      const response = await state.fetch("/api/credentials", {
        method: "POST",
        headers: { "X-Statekit-Session": kit.sid, "content-type": "application/json" },
        body: JSON.stringify({ username: "bo", password: "pw" }),
      });
      return [response.status, localStorage.getItem("statekit:login")];
    }""")
    assert kept[0] == 200
    assert kept[1]
    assert kept[1] != token  # the new token, stored
