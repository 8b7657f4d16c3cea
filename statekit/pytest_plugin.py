"""statekit's pytest plugin: fixtures for testing an app's state and its pages.

Enable it where you need it, in a ``conftest.py`` or a test module::

    pytest_plugins = ["statekit.pytest_plugin"]

or for one run: ``pytest -p statekit.pytest_plugin``. It is not registered as a
``pytest11`` entry point, since pytest loads those in every project where statekit is
installed.

Fixtures:

- ``fake_clock``: a :class:`~statekit.testing.FakeClock` (give it to an engine as
  ``clock=``, then ``fake_clock.advance(61)`` instead of sleeping);
- ``statekit_engine``: a :class:`~statekit.StateEngine` on that clock, over
  :func:`~statekit.testing.checked_store` (values are checked as a shared store would
  write them), shut down after the test;
- ``statekit_keys``: :class:`~statekit.BrowserKeys` with a secret made for the test,
  the same for every app the test builds (so browser state survives a restart);
- ``statekit_browser``: makes :class:`~statekit.testing.Browser` objects over an app's
  test client.

Example::

    def test_two_tabs(statekit_browser):
        browser = statekit_browser(TestClient(app))
        one, two = browser.open("/"), browser.open("/")
        two.close()
        assert one.post("/api/cart", json={"item": "Milk"}).status == 200
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from statekit import BrowserKeys, StateEngine
from statekit.testing import Browser, FakeClock, checked_store

__all__ = ["BrowserFactory", "fake_clock", "statekit_browser", "statekit_engine", "statekit_keys"]


class BrowserFactory(Protocol):
    """What ``statekit_browser`` is: ``statekit_browser(client, **options)`` makes a
    :class:`~statekit.testing.Browser` (options as its constructor's)."""

    def __call__(self, client: object, **options: Any) -> Browser: ...


@pytest.fixture
def fake_clock() -> FakeClock:
    """A :class:`~statekit.testing.FakeClock`, at 1000.0 until advanced."""
    return FakeClock()


@pytest.fixture
def statekit_engine(fake_clock: FakeClock) -> Iterator[StateEngine]:
    """A :class:`~statekit.StateEngine` on ``fake_clock`` over a checked memory store;
    shut down (its sessions ended with reason ``shutdown``) after the test."""
    engine = StateEngine(checked_store(), clock=fake_clock)
    yield engine
    engine.shutdown()


@pytest.fixture
def statekit_keys() -> BrowserKeys:
    """:class:`~statekit.BrowserKeys` with a random secret made for this test."""
    return BrowserKeys([secrets.token_urlsafe(32)])


@pytest.fixture
def statekit_browser() -> BrowserFactory:
    """Makes simulated browsers: ``statekit_browser(client)`` is
    ``Browser(client)``; see :class:`~statekit.testing.Browser`."""

    def make(client: object, **options: Any) -> Browser:
        return Browser(client, **options)

    return make
