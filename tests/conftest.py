from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from statekit import StateEngine
from statekit.testing import FakeClock

settings.register_profile("default", max_examples=300)
settings.register_profile("thorough", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> Iterator[StateEngine]:
    eng = StateEngine(clock=clock, idle_ttl=60, closed_ttl=30, capacity=1000)
    yield eng
    eng.shutdown()
