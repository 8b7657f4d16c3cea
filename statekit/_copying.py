"""Deep copies of session values.

A session value is copied when a session first materializes its default, when an
event reads it (so that a failed event cannot have mutated the stored value), and
when an event commits it (so that a reference kept by the caller cannot mutate the
store afterwards). Immutable atoms are returned as they are.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import fractions
import uuid
from typing import TypeVar

T = TypeVar("T")

# Types whose instances are immutable and hold only immutable data: copying them is
# the identity, exactly as copy.deepcopy treats them.
IMMUTABLE_ATOMS: frozenset[type] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        range,
        decimal.Decimal,
        fractions.Fraction,
        datetime.date,
        datetime.datetime,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        uuid.UUID,
        type(Ellipsis),
    }
)


def copy_value(value: T) -> T:
    """Return a deep copy of ``value``; immutable atoms come back unchanged.

    Raises:
        whatever :func:`copy.deepcopy` raises for a value it cannot copy.
    """
    if type(value) in IMMUTABLE_ATOMS:
        return value
    return copy.deepcopy(value)

