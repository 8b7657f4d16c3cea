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
from typing import Any, TypeVar

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


# Trees of builtin containers deeper than this are left to copy.deepcopy.
_MAX_FAST_DEPTH = 100


class _Fallback(Exception):
    """The value is not a plain tree of builtins: let copy.deepcopy handle it."""


def copy_value(value: T) -> T:
    """Return a deep copy of ``value``, exactly as :func:`copy.deepcopy` would.

    Immutable atoms come back unchanged. Trees of builtin containers (list, dict,
    tuple, set) holding atoms are copied by a fast path; anything else, and any value
    in which a container appears twice (shared or cyclic), goes to ``copy.deepcopy``,
    which preserves sharing.

    Raises:
        whatever :func:`copy.deepcopy` raises for a value it cannot copy.
    """
    if type(value) in IMMUTABLE_ATOMS:
        return value
    try:
        return _fast_copy(value, set(), 0)  # type: ignore[no-any-return]
    except _Fallback:
        return copy.deepcopy(value)


def _fast_copy(value: Any, seen: set[int], depth: int) -> Any:
    cls = type(value)
    if cls in IMMUTABLE_ATOMS:
        return value
    if depth > _MAX_FAST_DEPTH:
        raise _Fallback
    key = id(value)
    if key in seen:
        raise _Fallback
    seen.add(key)
    atoms = IMMUTABLE_ATOMS
    depth += 1
    if cls is list:
        return [x if type(x) in atoms else _fast_copy(x, seen, depth) for x in value]
    if cls is dict:
        out = {}
        for k, x in value.items():
            if type(k) not in atoms:
                raise _Fallback
            out[k] = x if type(x) in atoms else _fast_copy(x, seen, depth)
        return out
    if cls is tuple:
        items = [x if type(x) in atoms else _fast_copy(x, seen, depth) for x in value]
        # deepcopy returns the very tuple when no item needed copying
        return value if all(a is b for a, b in zip(items, value, strict=True)) else tuple(items)
    if cls is set:
        if all(type(x) in atoms for x in value):
            return set(value)
        raise _Fallback
    raise _Fallback
