from __future__ import annotations

import math

import pytest

from statekit.testing import FakeClock


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(10)
    assert clock() == 10
    assert clock.advance(2.5) == 12.5
    assert clock() == 12.5
    assert repr(clock) == "FakeClock(12.5)"


def test_fake_clock_refuses_to_go_back() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        FakeClock().advance(-1)


@pytest.mark.parametrize("step", [math.nan, math.inf])
def test_fake_clock_refuses_a_step_that_is_not_finite(step: float) -> None:
    # Fails if advance(nan) is taken: every later reading is then nan, and no
    # lifetime ever passes in the test.
    clock = FakeClock(10)
    with pytest.raises(ValueError, match="finite"):
        clock.advance(step)
    assert clock() == 10
    with pytest.raises(ValueError, match="finite"):
        FakeClock(math.nan)
