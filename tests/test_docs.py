"""The docs: every Python block of every page runs, the site builds with no warning, its
reference names every public name, and the built site works in a browser.

A page's blocks run in a process of their own (``tests/_doc_blocks.py``), top to
bottom, as a reader would run them, with the test servers for the blocks that reach
Redis. A stale example, a reference that misses a name, a broken link or anchor, or a
docstring the site cannot read fails here.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from statekit.testing import RedisServer

from .test_browser_e2e import ARTIFACTS, WAIT_MS, chromium

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
#: The public modules, and the reference page that documents each one's names.
REFERENCE = {
    "statekit": "statekit.md",
    "statekit.stores": "stores.md",
    "statekit.exceptions": "exceptions.md",
    "statekit.testing": "testing.md",
    "statekit.web": "web.md",
}
INTEGRATIONS = ["asgi", "fastapi", "flask", "django", "prometheus"]


def _has_python_blocks(page: str) -> bool:
    return "```python" in (ROOT / page).read_text(encoding="utf-8")


@pytest.mark.parametrize("page", [p for p in PAGES if _has_python_blocks(p)])
def test_every_python_block_of_the_page_runs(
    page: str, redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    env = {
        **os.environ,
        "STATE_SECRET": secrets.token_hex(32),
        "DOCS_REDIS_URL": redis_server.url,
        "PYTHONPATH": str(ROOT),
    }
    if "redis+cluster://" in (ROOT / page).read_text(encoding="utf-8"):
        cluster = request.getfixturevalue("redis_cluster")
        nodes = ",".join(f"{host}:{port}" for host, port in cluster.startup_nodes)
        env["DOCS_CLUSTER_URL"] = f"redis+cluster://{nodes}"
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_doc_blocks.py"), page],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def test_every_page_with_code_is_run() -> None:
    """The pages whose blocks run are every page with a Python block: a page added to
    docs/ is collected by the test above with no list to keep. (Fails if the pattern
    missed a page: the count of blocks run would differ from the count in the docs.)"""
    from ._doc_blocks import blocks

    collected = sum(len(blocks(ROOT / p)) for p in PAGES)
    in_docs = sum((ROOT / p).read_text(encoding="utf-8").count("```python") for p in PAGES)
    assert collected == in_docs > 40


def test_only_other_libraries_code_is_left_unrun() -> None:
    """Code fenced ``py`` is not run: it is kept for the other libraries' code on the
    page that compares them with statekit, and nowhere else (a statekit block fenced
    ``py`` to escape the test above fails here)."""
    fenced = {p for p in PAGES if "```py\n" in (ROOT / p).read_text(encoding="utf-8")}
    assert fenced == {"docs/coming-from.md"}
    text = (ROOT / "docs" / "coming-from.md").read_text(encoding="utf-8")
    for block in re.findall(r"^```py\n(.*?)^```", text, re.S | re.M):
        assert "statekit" not in block, block
        assert "engine" not in block, block


def test_the_reference_documents_every_public_name() -> None:
    for module_name, page in REFERENCE.items():
        text = (ROOT / "docs" / "reference" / page).read_text(encoding="utf-8")
        documented = re.findall(rf"^::: {re.escape(module_name)}\.(\w+)$", text, re.M)
        module = importlib.import_module(module_name)
        assert sorted(documented) == sorted(module.__all__), page
    text = (ROOT / "docs" / "reference" / "integrations.md").read_text(encoding="utf-8")
    assert re.findall(r"^::: statekit\.integrations\.(\w+)$", text, re.M) == INTEGRATIONS
    assert sorted(
        p.stem for p in (ROOT / "statekit" / "integrations").glob("*.py") if p.stem[0] != "_"
    ) == sorted(INTEGRATIONS)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built as CI builds it: ``mkdocs build --strict`` (every warning an
    error: a docstring the reference cannot read, a broken link or anchor)."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "WARNING" not in run.stderr, run.stderr[-4000:]
    return out


def test_the_site_builds_with_no_warning(site: Path) -> None:
    assert (site / "index.html").is_file()
    page = (site / "reference" / "statekit" / "index.html").read_text(encoding="utf-8")
    assert 'id="statekit.StateEngine"' in page  # the reference, generated
    assert 'id="statekit.StateEngine.user_state"' in page  # with its members


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # no line per request
        pass


@pytest.fixture
def served(site: Path) -> Iterator[str]:
    """The built site on 127.0.0.1, a free port."""
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def test_the_site_in_chromium(
    served: str, browser: Browser, request: pytest.FixtureRequest
) -> None:
    """The home page, the reference of StateEngine and a search for "expiry", in a real
    browser; screenshots on failure."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(served)
        assert "statekit" in page.title()
        page.goto(served + "reference/statekit/")
        page.wait_for_selector('[id="statekit.StateEngine"]')
        assert "user_idle_ttl" in (page.text_content('[id="statekit.StateEngine"] ~ div') or "")
        # The search index loads in a worker after the page; a query typed before it is
        # ready is not searched again (seen on a busy machine, where a query set at once
        # was not searched either): let the page's fetches settle, then type the query
        # key by key until results show.
        page.goto(served)
        page.wait_for_load_state("networkidle")
        search = page.locator("input[data-md-component=search-query]")
        results = page.locator(".md-search-result__item").first
        for _ in range(6):
            search.click()
            search.fill("")
            search.press_sequentially("expiry", delay=20)
            try:
                results.wait_for(timeout=WAIT_MS / 2)
                break
            except PlaywrightTimeout:
                continue
        results.wait_for()
        found = page.text_content(".md-search-result__list") or ""
        assert "expir" in found.lower()
        assert errors == []
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"))
        raise
    finally:
        context.close()
