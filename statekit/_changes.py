"""The change detector: did a value change between two moments of an event?

Pure functions with no knowledge of the engine. :func:`compare` walks two values side
by side with an explicit stack, so cycles and deep nesting never raise
``RecursionError``, and answers with a :class:`Change`:

- builtin containers (``list``, ``tuple``, ``dict``, ``set``, ``frozenset`` and their
  subclasses) are compared element by element, exactly: type and value, so ``1``,
  ``1.0`` and ``True`` differ, and no hash collision can hide a change; dict key order
  does not matter;
- value types (numbers, strings, bytes, dates, UUIDs, decimals) are compared by type
  and value; ``nan`` equals ``nan`` and ``-0.0`` differs from ``0.0``;
- functions, classes and other objects that :func:`copy.deepcopy` keeps as they are
  are compared by identity;
- other objects whose class defines ``__hash__`` are compared by that hash (the rule of
  the guide statekit follows). When the hashes agree, their fields are still compared:
  a difference there is reported as :attr:`Change.QUIET`, which tells the engine to
  store the value without firing listeners, so no write is ever lost to a weak hash;
- objects with identity hashing are compared by their fields (``__dict__`` and
  ``__slots__``, which covers attrs classes and dataclasses), so in-place mutation is
  seen;
- anything else is compared by its pickle, then by ``==``; when neither gives an
  answer the value is reported changed (a spurious change is safe, a missed one is not).
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import math
import pickle
import types
import uuid
import weakref
from collections.abc import Iterator, Sized
from typing import Any, Final, cast

from ._copying import IMMUTABLE_ATOMS, Image, Sealed, image_of, seal

__all__ = ["Change", "changed", "compare", "judge", "walk"]


class Change(enum.IntEnum):
    """The verdict of :func:`compare`, ordered by severity."""

    SAME = 0
    """No difference at all."""
    QUIET = 1
    """Different only inside objects whose own ``__hash__`` says they are equal."""
    CHANGED = 2
    """Different: listeners fire."""


# The members as plain names: reading an enum member through its class costs a
# descriptor call, which the hot paths of events and of the walk avoid.
SAME: Final = Change.SAME
QUIET: Final = Change.QUIET
CHANGED: Final = Change.CHANGED

_EQ_ATOMS: frozenset[type] = frozenset(
    {type(None), bool, int, str, bytes, bytearray, range, fractions.Fraction, uuid.UUID}
)
#: Atoms stored as they are (immutable) whose ``==`` within one type is exact: for
#: these, "same type and equal" is the whole verdict (not so for float: 0.0 == -0.0).
EXACT_ATOMS: frozenset[type] = _EQ_ATOMS & IMMUTABLE_ATOMS
_TZ_ATOMS: frozenset[type] = frozenset({datetime.datetime, datetime.time})
_PLAIN_DATES: frozenset[type] = frozenset({datetime.date, datetime.timedelta, datetime.timezone})
# What copy.deepcopy keeps as it is (besides value atoms): same only when identical.
_IDENTITY_TYPES: tuple[type, ...] = (
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.ModuleType,
    types.CodeType,
    weakref.ref,
    property,
    type(Ellipsis),
    type(NotImplemented),
)


def _same_float(a: float, b: float) -> bool:
    if a == b:
        return a != 0.0 or math.copysign(1.0, a) == math.copysign(1.0, b)
    return a != a and b != b  # both nan


def _same_atom(t: type, a: Any, b: Any) -> bool | None:
    """Compare two values of the exact type ``t``; None when ``t`` is not an atom."""
    if t in _EQ_ATOMS:
        return bool(a == b)
    if t is float:
        return _same_float(a, b)
    if t is complex:
        return _same_float(a.real, b.real) and _same_float(a.imag, b.imag)
    if t is decimal.Decimal:
        return bool(a.as_tuple() == b.as_tuple())
    if t in _TZ_ATOMS:
        return bool(a == b and a.tzinfo == b.tzinfo and a.fold == b.fold)
    if t in _PLAIN_DATES:
        return bool(a == b)
    return None


def _fields(obj: Any) -> dict[str, Any] | None:
    """The instance fields of ``obj`` (``__dict__`` and ``__slots__``), or None."""
    found: dict[str, Any] | None = None
    d = getattr(obj, "__dict__", None)
    if isinstance(d, dict):
        found = dict(d)
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__")
        if slots is None:
            continue
        if isinstance(slots, str):
            slots = (slots,)
        for name in slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if found is None:
                found = {}
            try:
                found[f"{cls.__qualname__}.{name}"] = object.__getattribute__(obj, name)
            except AttributeError:
                found[f"{cls.__qualname__}.{name}"] = _UNSET
    return found


class _Unset:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<unset slot>"


_UNSET = _Unset()


def _opaque_same(a: Any, b: Any) -> bool:
    """Last resort for objects with neither a hash of their own nor fields."""
    try:
        return pickle.dumps(a, protocol=5) == pickle.dumps(b, protocol=5)
    except Exception:
        pass
    try:
        verdict = a == b
    except Exception:
        return False
    return verdict is True


def _own_hash(t: type) -> bool:
    h = getattr(t, "__hash__", None)
    return h is not None and h is not object.__hash__


class _Mismatch:
    """Yielded by a pair generator when the two containers cannot be equal."""

    __slots__ = ()


_MISMATCH = _Mismatch()

_Pairs = Iterator["tuple[Any, Any] | _Mismatch"]


def _dict_pairs(a: dict[Any, Any], b: dict[Any, Any]) -> _Pairs:
    """Pairs to compare for two dicts of equal length, lazily."""
    exact_keys: dict[Any, Any] | None = None
    unmatched: list[Any] = []
    for key, va in a.items():
        try:
            vb = b[key]
        except KeyError:
            unmatched.append(key)
            continue
        if type(key) is not str:
            # 1, 1.0 and True are one dict key: make sure b holds the same kind.
            if exact_keys is None:
                exact_keys = {k: k for k in b}
            yield key, exact_keys[key]
        yield va, vb
    if unmatched:
        matches = _match_leftovers(unmatched, [k for k in b if k not in a])
        if matches is None:
            yield _MISMATCH
            return
        for key_a, key_b in matches:
            yield a[key_a], b[key_b]


def _set_pairs(a: Any, b: Any) -> _Pairs:
    """Pairs to compare for two sets of equal length: members matched by equality."""
    members = {x: x for x in b}
    unmatched: list[Any] = []
    for x in a:
        try:
            yield x, members[x]
        except KeyError:
            unmatched.append(x)
    if unmatched and _match_leftovers(unmatched, [y for y in b if y not in a]) is None:
        yield _MISMATCH


def _match_leftovers(left: list[Any], right: list[Any]) -> list[tuple[Any, Any]] | None:
    """Match keys or members that lookup could not pair, such as NaN, which is not
    equal to itself; None when some cannot be matched."""
    if len(left) != len(right):
        return None
    pairs = []
    remaining = list(right)
    for x in left:
        for i, y in enumerate(remaining):
            if walk(x, y) is SAME:
                pairs.append((x, y))
                del remaining[i]
                break
        else:
            return None
    return pairs


def compare(before: Any, after: Any) -> Change:
    """Compare two values exactly; see the module docstring for the rules.

    Never raises for any input (errors inside user-defined ``__hash__``, ``__eq__`` or
    pickling count as a change) and never recurses. Two builtin-only values are first
    compared by their sealed images, in C; the walk runs only when those differ.
    """
    if before is after:
        return SAME
    blob = seal(before)
    if blob is not None and blob == seal(after):
        return SAME
    return walk(before, after)


def judge(stored: Any, after: Any) -> tuple[Change, Image | None]:
    """Compare a stored value (an atom, a :class:`Sealed` image or a private copy) with
    the value an event ends with.

    Returns the verdict and, when it was computed, the image of ``after`` (which the
    caller passes on to ``stored_form`` rather than computing it again).
    """
    if type(stored) is Sealed:
        image = image_of(after)
        if image is not None and image[0] == stored.blob:
            return SAME, image
        # Another class, or a builtin container of another length, is a change: told
        # without opening the image (most events add or remove items), for an image
        # of builtin types alone (kind None otherwise: the walk decides).
        kind = stored.kind
        if kind is not None and (
            type(after) is not kind
            or (stored.size >= 0 and len(cast(Sized, after)) != stored.size)
        ):
            return CHANGED, image
        return walk(stored.open(), after), image
    if stored is after:
        return SAME, None
    cls = type(stored)
    if cls is type(after):
        same = _same_atom(cls, stored, after)
        if same is not None:
            return (SAME if same else CHANGED), None
    return walk(stored, after), None


def walk(before: Any, after: Any) -> Change:
    """The exact comparison: a depth-first walk over pairs, with a stack of lazy pair
    iterators (memory grows with depth, not width) and a memo of visited pairs."""
    result = SAME
    stack: list[tuple[Iterator[Any], bool]] = [(iter(((before, after),)), False)]
    seen: set[tuple[int, int]] = set()
    # Field dicts built during the walk stay referenced until it ends, so that their
    # ids in ``seen`` cannot be reused by later temporaries.
    keep: list[Any] = []
    while stack:
        pairs_iter, quiet = stack[-1]
        pair = next(pairs_iter, None)
        if pair is None:
            stack.pop()
            continue
        same: bool | None
        if pair is _MISMATCH:
            same = False
            stack.pop()
        else:
            a, b = pair
            if a is b:
                continue
            t = type(a)
            same = False if t is not type(b) else _same_atom(t, a, b)
        if same is None:
            key = (id(a), id(b))
            if key in seen:
                continue
            seen.add(key)
            pairs: Iterator[Any] | None
            inner_quiet = quiet
            container = True
            if isinstance(a, (list, tuple)):
                pairs = zip(a, b, strict=True) if len(a) == len(b) else None
            elif isinstance(a, dict):
                pairs = _dict_pairs(a, b) if len(a) == len(b) else None
            elif isinstance(a, (set, frozenset)):
                pairs = _set_pairs(a, b) if len(a) == len(b) else None
            elif isinstance(a, (_IDENTITY_TYPES, enum.Enum)):
                pairs = None  # identical ones were handled above
            else:
                container = False
                pairs, inner_quiet, same = _custom_pairs(t, a, b, quiet, keep)
            if same is None:
                if pairs is None:
                    same = False
                else:
                    stack.append((pairs, inner_quiet))
                    # Subclasses of builtin containers may carry attributes too.
                    if container and t not in _PLAIN_CONTAINERS:
                        fa, fb = _fields(a), _fields(b)
                        if fa is not None or fb is not None:
                            keep.append((fa, fb))
                            stack.append((iter(((fa, fb),)), quiet))
                    continue
        if not same:
            if not quiet:
                return CHANGED
            result = QUIET
    return result


_PLAIN_CONTAINERS: frozenset[type] = frozenset({list, tuple, dict, set, frozenset})


def _custom_pairs(
    t: type, a: Any, b: Any, quiet: bool, keep: list[Any]
) -> tuple[Iterator[Any] | None, bool, bool | None]:
    """How to compare two instances of a user-defined class.

    Returns the pairs to walk, whether differences below are quiet, and a verdict
    when one is already known.
    """
    if _own_hash(t):
        try:
            if hash(a) != hash(b):
                return None, quiet, False
        except Exception:
            return None, quiet, False
        quiet = True  # the class's own hash says equal: field differences are quiet
    fa, fb = _fields(a), _fields(b)
    if fa is None or fb is None:
        return None, quiet, _opaque_same(a, b)
    keep.append((fa, fb))
    return iter([(fa, fb)]), quiet, None


def changed(before: Any, after: Any) -> bool:
    """Whether listeners should fire: ``compare(before, after) is CHANGED``."""
    return compare(before, after) is CHANGED
