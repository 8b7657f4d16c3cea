"""The documented examples run and say what the docs say they say."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def test_console_demo_walks_through_the_guide(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "console_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "tab A: visitor #1" in out
    assert "tab A adds Milk, Water      -> outputs {'cart_size': 2}" in out
    assert "tab B's cart: ['Cereal']" in out
    assert "tab A's cart is still ['Milk', 'Water', 'Orange Juice']" in out
    assert "deleted: closed" in out
    assert "deleted: idle" in out
    assert "deleted: evicted" in out
    assert "visitors: 7, live sessions: 3" in out


def readme_example(index: int = 0) -> str:
    """The README's Python block number ``index`` (0: the first)."""
    readme = (EXAMPLES.parent.parent / "README.md").read_text()
    return readme.split("```python\n")[1 + index].split("```", 1)[0]


def test_readme_example_runs_and_prints_what_it_says(capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip() == "{'cart_size': 1}"


def test_readmes_web_app_keeps_a_cart_per_tab() -> None:
    """The README's FastAPI app, driven as a browser with two tabs would: each tab's
    cart is its own (fails if the middleware gave both tabs one session, or if the
    block stopped running as written)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from statekit.testing import Browser

    scope: dict[str, object] = {"__name__": "readme_web"}
    exec(compile(readme_example(1), "README.md", "exec"), scope)
    app: FastAPI = scope["app"]  # type: ignore[assignment]
    app.get("/")(lambda: "the page")  # the page the tabs load (the README shows none)
    with TestClient(app) as client:
        browser = Browser(client)
        one, two = browser.open("/"), browser.open("/")
        assert one.post("/api/cart").json() == ["Milk"]
        assert one.post("/api/cart").json() == ["Milk", "Milk"]
        assert two.post("/api/cart").json() == ["Milk"]


@pytest.mark.parametrize("index", [0, 1], ids=["engine", "web app"])
def test_readme_example_passes_mypy_strict_as_written(tmp_path: Path, index: int) -> None:
    """A user's type checker accepts the code they read first: ``ev.result.outputs``
    after the block is an EventResult's, not an optional's (an ``EventResult | None``
    fails here with union-attr), and the web app's dependency is typed."""
    from mypy import api

    example = tmp_path / "readme_example.py"
    example.write_text(readme_example(index))
    out, err, status = api.run(
        [str(example), "--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"]
    )
    assert (status, out, err) == (0, "", "")


def test_import_statekit_loads_no_optional_dependency() -> None:
    import subprocess
    import sys

    code = (
        "import sys, statekit, statekit.stores, statekit.testing, statekit.web; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'redis', 'cryptography', 'starlette', 'uvicorn', 'playwright', 'fastapi', "
        "'flask', 'django', 'aiohttp', 'httpx', 'pytest'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
