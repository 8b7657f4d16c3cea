from __future__ import annotations

from collections.abc import Iterator

import pytest

from statekit import StateEngine
from statekit.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[StateEngine]:
    eng = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=1000)
    yield eng
    eng.shutdown()
