"""The demo web app over HTTP (Starlette's test client): the four patterns, and the
session-id and browser-token plumbing a host does."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from statekit import BrowserKeys

APP = runpy.run_path(str(Path(__file__).resolve().parent.parent / "docs/examples/web_app.py"))
SECRET = "w" * 32


def client(keys: BrowserKeys | None = None) -> TestClient:
    return TestClient(APP["build_app"](keys or BrowserKeys([SECRET])))


def load(c: TestClient, tokens: dict[str, str] | None = None) -> Any:
    response = c.post("/api/load", headers={"x-statekit-browser": json.dumps(tokens or {})})
    assert response.status_code == 200
    return response


def test_the_four_patterns() -> None:
    with client() as alice, client() as other_app:
        first = load(alice).json()
        assert (first["visitors"], first["cart"], first["counter"]) == (1, [], 0)
        assert load(alice).json()["visitors"] == 2  # each page load counts
        added = alice.post("/api/cart", json={"items": ["Milk", "Water", "Nope"]}).json()
        assert added == {"cart": ["Milk", "Water"], "cart_size": 2}
        assert alice.post("/api/counter").json() == {"counter": 1}
        assert alice.post("/api/counter").json() == {"counter": 2}
        assert load(other_app).json()["visitors"] == 1  # another app, another engine


def test_credentials_live_in_the_browser_encrypted() -> None:
    with client() as c:
        load(c)
        saved = c.post(
            "/api/credentials",
            json={"username": "ann", "password": "hunter2"},
            headers={"x-statekit-browser": "{}"},
        )
        tokens = json.loads(saved.headers["x-statekit-browser-set"])
        assert set(tokens) == {"login"}
        assert "hunter2" not in tokens["login"]
        assert SECRET not in saved.text
        restored = load(c, tokens).json()
        assert (restored["username"], restored["password"]) == ("ann", "hunter2")


def test_foreign_or_garbage_tokens_give_defaults_not_errors() -> None:
    with client() as c:
        for header in ['{"login": "sk1.AAAA.BBBB.CCCC"}', "not json", "[1, 2]", '{"login": 5}']:
            response = c.post("/api/load", headers={"x-statekit-browser": header})
            assert response.status_code == 200
            assert (response.json()["username"], response.json()["password"]) == ("", "")


@pytest.mark.parametrize("path", ["/api/cart", "/api/counter", "/api/credentials"])
def test_requests_without_a_live_session_are_told_to_reload(path: str) -> None:
    with client() as c:
        c.cookies.set("statekit_sid", "forged-id")
        response = c.post(path, json={})
        assert response.status_code == 409
        assert "reload" in response.json()["error"]


def test_closing_the_tab_closes_the_session_and_serves_the_helper() -> None:
    with client() as c:
        load(c)
        assert c.post("/api/close").status_code == 204
        assert c.post("/api/counter").status_code == 409  # its object was cleaned up
        script = c.get("/statekit.js")
        assert "X-Statekit-Browser-Set" in script.text
        assert "statekit demo" in c.get("/").text
