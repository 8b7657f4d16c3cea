"""Clocks.

A clock is any zero-argument callable returning seconds as a float. Lifetimes inside
one process use :func:`time.monotonic` (it never jumps); stores shared between
processes or hosts use :func:`time.time`, the only clock those processes share.
Tests inject :class:`statekit.testing.FakeClock` instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

Clock: TypeAlias = Callable[[], float]

monotonic: Clock = time.monotonic
wall: Clock = time.time
