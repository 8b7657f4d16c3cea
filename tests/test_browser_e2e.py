"""The demo app in a real browser: Debian's Chromium driven by Playwright, against the
app served on 127.0.0.1 by a server process this test starts and restarts.

In CI a missing Chromium fails these tests (dev.py installs it); they never skip."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoServer:
    """The demo app in its own process, restartable on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self, secrets: str) -> None:
        env = {**os.environ, "STATEKIT_SECRETS": secrets, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "docs/examples/web_app.py"), "--port", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("the demo server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        raise RuntimeError("Chromium is not installed (Debian: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def server() -> Iterator[DemoServer]:
    demo = DemoServer()
    demo.start(SECRET)
    yield demo
    demo.stop()


@pytest.fixture
def pages(browser: Browser, request: pytest.FixtureRequest) -> Iterator[list[Page]]:
    """Pages to use; each is screenshotted into test-artifacts/ if the test fails."""
    opened: list[Page] = []
    errors: list[str] = []
    yield opened
    report = getattr(request.node, "rep_call", None)
    for i, page in enumerate(opened):
        if report is not None and report.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{i}.png"))
        page.context.close()
    assert errors == []


def open_page(browser: Browser, pages: list[Page], url: str) -> Page:
    page = browser.new_context().new_page()
    pages.append(page)
    page.on("pageerror", lambda exc: pytest.fail(f"error on the page: {exc}"))
    page.goto(url)
    wait_ready(page)
    return page


def wait_ready(page: Page) -> None:
    page.wait_for_selector("body[data-ready=yes]", timeout=10_000)


def reload(page: Page) -> None:
    page.evaluate("delete document.body.dataset.ready")
    page.reload()
    wait_ready(page)


def credentials(page: Page) -> tuple[str, str]:
    return page.input_value("#username"), page.input_value("#password")


def save(page: Page, username: str, password: str) -> None:
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#save")
    page.wait_for_selector("#saved:has-text('Saved')")


def test_credentials_survive_reload_restart_and_rotation(
    browser: Browser, server: DemoServer, pages: list[Page]
) -> None:
    page = open_page(browser, pages, server.url)
    save(page, "ann", "correct horse battery")
    stored = page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert "correct horse battery" not in stored  # never in plain text
    assert "ann" not in stored
    assert stored.count("sk1.") == 1  # one encrypted token

    reload(page)
    assert credentials(page) == ("ann", "correct horse battery")

    server.stop()
    server.start(SECRET)  # a restart with the same secret
    reload(page)
    assert credentials(page) == ("ann", "correct horse battery")

    server.stop()
    server.start(f"{NEW},{SECRET}")  # rotated: the old secret second
    reload(page)
    assert credentials(page) == ("ann", "correct horse battery")

    server.stop()
    server.start(UNRELATED)  # an unrelated secret: defaults, and no error on the page
    reload(page)
    assert credentials(page) == ("", "")


def test_two_browsers_have_their_own_carts_and_one_visitor_count(
    browser: Browser, server: DemoServer, pages: list[Page]
) -> None:
    alice = open_page(browser, pages, server.url)
    bob = open_page(browser, pages, server.url)
    alice.check("input[value='Milk']")
    alice.check("input[value='Water']")
    alice.click("#add")
    alice.wait_for_selector("#cart-size:has-text('2')")
    bob.check("input[value='Cereal']")
    bob.click("#add")
    bob.wait_for_selector("#cart-size:has-text('1')")
    assert alice.text_content("#cart") == '["Milk","Water"]'
    assert bob.text_content("#cart") == '["Cereal"]'
    reload(alice)  # a refresh is a new session: an empty cart, one more visitor
    assert alice.text_content("#cart") == "[]"
    assert alice.text_content("#visitors") == "3"
    bob.click("#increment")
    bob.wait_for_selector("#counter:has-text('1')")
