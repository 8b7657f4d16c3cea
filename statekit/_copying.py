"""Deep copies of session values, and sealed images of them.

A session value is copied when a session first materializes its default, when an
event reads it (so that a failed event cannot have mutated the stored value), and
when it is written (so that a reference kept by the caller cannot reach the store).

Values made only of builtin types (``None``, ``bool``, ``int``, ``float``, ``complex``,
``str``, ``bytes``, ``bytearray``, ``list``, ``tuple``, ``dict``, ``set``,
``frozenset``) are kept *sealed*: as their pickle, made by a pickler that refuses every
other type. A sealed image is exact (``1``, ``1.0`` and ``True`` differ; so do lists and
tuples), keeps sharing and cycles, is made and opened in C, and doubles as the snapshot
the change detector compares against: a value whose new image equals the stored one
has not changed.

:func:`copy_value` gives the same result as :func:`copy.deepcopy`, faster and at any
depth: atoms are returned as they are, builtin-only trees go through their sealed
image, and anything else is copied by an iterative walk over builtin containers that
hands other objects to :func:`copy.deepcopy` with a shared memo.
"""

from __future__ import annotations

import copy
import copyreg
import datetime
import decimal
import fractions
import gc
import io
import pickle
import uuid
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

__all__ = [
    "IMMUTABLE_ATOMS",
    "Image",
    "Sealed",
    "copy_value",
    "image_of",
    "open_value",
    "seal",
    "stored_form",
]

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

_CONTAINERS: frozenset[type] = frozenset({list, dict, tuple, set, frozenset})


class _NotFaithful(Exception):
    pass


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement
_REFUSE, _DEFAULT, _DICT = "refuse", "default", "dict"


def _plan(cls: type) -> str:
    """How the faithful pickler takes an instance of ``cls`` (worked out once per class):

    - ``_REFUSE``: the class copies itself (``__deepcopy__``): pickle would not call it;
    - ``_DICT``: a plain class — made by a class statement on ``object`` alone (a
      dataclass, say), no ``__slots__``, no ``__new__``, ``__reduce__``,
      ``__reduce_ex__``, ``__getstate__``, ``__setstate__`` or ``__getnewargs__`` of
      its own, no copyreg entry: its instances are exactly ``object.__new__(cls)`` with
      their ``__dict__``, which is what ``copy.deepcopy`` makes of them, and the
      pickler writes that without asking the object (the default protocol costs a
      call into ``__reduce_ex__`` and, when opened, a Python call per object);
    - ``_DEFAULT``: anything else: the ``__reduce_ex__`` protocol, as deepcopy uses it.
    """
    if issubclass(cls, type):  # a class, pickled by its name
        return _DEFAULT
    if getattr(cls, "__deepcopy__", None) is not None:
        return _REFUSE
    plain = (
        all(base is object or base.__flags__ & _HEAPTYPE for base in cls.__mro__)
        and all("__slots__" not in vars(base) for base in cls.__mro__)
        and cls.__new__ is object.__new__
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and getattr(cls, "__getstate__", None) in (None, getattr(object, "__getstate__", None))
        and not hasattr(cls, "__setstate__")
        and not hasattr(cls, "__getnewargs__")
        and not hasattr(cls, "__getnewargs_ex__")
        and cls not in copyreg_table
    )
    return _DICT if plain else _DEFAULT


copyreg_table = copyreg.dispatch_table
_PLANS: dict[type, str] = {}  # filled as classes are met; a class's plan never changes
_MAX_PLANS = 4096


class _FaithfulPickler(pickle.Pickler):
    """Pickles a value only where unpickling gives what ``copy.deepcopy`` would.

    Builtin containers and atoms take pickle's own fast paths; every other object comes
    through :meth:`reducer_override`, which follows its class's plan (:func:`_plan`):
    refuse a class with a ``__deepcopy__`` of its own (deepcopy would call it, pickle
    would not), write a plain class's instance as ``object.__new__(cls)`` and its
    ``__dict__``, and let the rest use the same ``__reduce_ex__`` protocol that
    deepcopy uses.
    """

    custom = False

    def reducer_override(self, obj: Any) -> Any:
        cls = obj.__class__
        plan = _PLANS.get(cls)
        if plan is None:
            if len(_PLANS) >= _MAX_PLANS:  # classes made at run time: bounded all the same
                _PLANS.clear()
            plan = _PLANS[cls] = _plan(cls)
        if plan is _DICT:
            self.custom = True
            return _NEW, (cls,), obj.__dict__
        if plan is _REFUSE:
            raise _NotFaithful
        self.custom = True
        return NotImplemented


_NEW = object.__new__


Image: TypeAlias = tuple[bytes, bool]
"""A value's pickle, and whether it holds objects of user-defined classes."""


def image_of(value: Any) -> Image | None:
    """The image of a value and whether user classes are inside, or None. Never raises."""
    if type(value) in IMMUTABLE_ATOMS:
        return None
    buffer = io.BytesIO()
    pickler = _FaithfulPickler(buffer, protocol=5)
    try:
        pickler.dump(value)
    except Exception:  # not picklable, nested too deep, a __reduce__ that fails ...
        return None
    return buffer.getvalue(), pickler.custom


# Unpickling a large image allocates many containers at once, and each batch of
# allocations would start a garbage collection that walks every tracked object of the
# process (about half the cost of opening a 100,000-entry dict). Collection is paused
# while such an image is opened; it resumes right after.
_PAUSE_GC_ABOVE = 64 * 1024


def _unpickle(blob: bytes) -> Any:
    if len(blob) < _PAUSE_GC_ABOVE or not gc.isenabled():
        return pickle.loads(blob)
    gc.disable()
    try:
        return pickle.loads(blob)
    finally:
        gc.enable()


def seal(value: Any) -> bytes | None:
    """The image of a value, or None when it has none (see :class:`Sealed`).

    Two values with equal images are equal in type and value all the way down. Atoms
    have no image: compare them directly. Never raises.
    """
    image = image_of(value)
    return None if image is None else image[0]


class Sealed:
    """A stored value kept as its image: its pickle, made so that unpickling it gives
    exactly what ``copy.deepcopy`` would. Immutable; :meth:`open` gives a new copy.

    Images are made on the server from server-side values and never leave the process
    (stores that leave it use their own codec); nothing from a client is unpickled.
    """

    __slots__ = ("blob", "kind", "size")

    def __init__(self, blob: bytes, value: Any, *, custom: bool = False) -> None:
        self.blob = blob
        #: The value's class, and its length when it is a builtin container (else
        #: -1): enough to tell most changes (an item added or removed) without
        #: opening the image (see ``_changes.judge``). Kept only for an image of
        #: builtin types alone (``custom`` False), which opens as the same class and
        #: length; user classes may open as others (a ``__reduce__`` of their own, a
        #: set whose members' hash changed, a class defined anew): None, -1.
        self.kind: type | None = None if custom else type(value)
        self.size = len(value) if self.kind in _CONTAINERS else -1

    def __repr__(self) -> str:
        return f"<Sealed value, {len(self.blob)} bytes>"

    def open(self) -> Any:
        """A new deep copy of the value."""
        return _unpickle(self.blob)


def stored_form(value: Any, image: Image | None = None) -> Any:
    """What a store keeps for ``value``: an atom as it is, else a :class:`Sealed` image,
    else (no image) a private deep copy. ``image``, if given, is ``image_of(value)``.

    Raises:
        whatever :func:`copy.deepcopy` raises for a value it cannot copy.
    """
    if type(value) in IMMUTABLE_ATOMS:
        return value
    if image is None:
        image = image_of(value)
    if image is not None:
        blob, custom = image
        if not custom:
            return Sealed(blob, value)
        try:  # a user-defined __reduce__ may pickle fine and fail to unpickle
            _unpickle(blob)
        except Exception:
            pass
        else:
            return Sealed(blob, value, custom=True)
    return copy_value(value)


def open_value(stored: Any) -> Any:
    """A private copy of a stored value (the inverse of :func:`stored_form`)."""
    cls = type(stored)
    if cls in IMMUTABLE_ATOMS:
        return stored
    if cls is Sealed:
        return stored.open()
    return copy_value(stored)


def copy_value(value: T) -> T:
    """Return a deep copy of ``value``, equal to what :func:`copy.deepcopy` returns.

    Works at any nesting depth for builtin containers. Thread-safe (pure).

    Raises:
        whatever :func:`copy.deepcopy` raises for an object it cannot copy (for
        example ``TypeError`` for a lock).
    """
    cls = type(value)
    if cls in IMMUTABLE_ATOMS:
        return value
    if cls is tuple and all(type(item) in IMMUTABLE_ATOMS for item in value):  # type: ignore[attr-defined]
        return value  # immutable all the way down, as deepcopy sees it
    image = image_of(value)
    if image is not None:
        try:
            return _unpickle(image[0])  # type: ignore[no-any-return]
        except Exception:  # a user-defined __reduce__ that cannot be undone
            pass
    if cls in _CONTAINERS:
        return _copy_tree(value)  # type: ignore[no-any-return]
    return copy.deepcopy(value)


class _Building:
    """A tuple or frozenset whose items are still being copied."""

    __slots__ = ("items", "source")

    def __init__(self, source: Any) -> None:
        self.source = source
        self.items: list[Any] = []


def _copy_tree(root: Any) -> Any:
    """Deep-copy with an explicit stack: builtin containers are walked, anything else
    goes to ``copy.deepcopy`` with the same memo (which keeps sharing intact)."""
    memo: dict[int, Any] = {}
    result: list[Any] = [None]
    # A task is (source object, function storing its copy). A _Building marker on the
    # stack finishes a tuple or frozenset once its items are all copied.
    stack: list[tuple[Any, Callable[[Any], None]] | _Building] = [(root, _setter(result, 0))]
    atoms = IMMUTABLE_ATOMS
    while stack:
        task = stack.pop()
        if isinstance(task, _Building):
            source = task.source
            if all(a is b for a, b in zip(task.items, source, strict=True)):
                built = source  # as deepcopy: nothing inside needed copying
            else:
                built = tuple(task.items) if type(source) is tuple else frozenset(task.items)
            memo[id(source)] = built
            for store_built in memo.pop(-id(source) - 1):
                store_built(built)
            continue
        obj, store = task
        cls = type(obj)
        if cls in atoms:
            store(obj)
            continue
        key = id(obj)
        if key in memo:
            store(memo[key])
        elif cls is list:
            new_list: list[Any] = [None] * len(obj)
            memo[key] = new_list
            store(new_list)
            stack.extend((item, _setter(new_list, i)) for i, item in enumerate(obj))
        elif cls is dict:
            new_dict: dict[Any, Any] = {}
            memo[key] = new_dict
            store(new_dict)
            for k, v in obj.items():
                new_key = k if type(k) in atoms else copy.deepcopy(k, memo)
                new_dict[new_key] = None  # keeps the key order; the value comes below
                stack.append((v, _setter(new_dict, new_key)))
        elif cls is set:
            new_set: set[Any] = set()
            memo[key] = new_set
            store(new_set)
            new_set.update(x if type(x) in atoms else copy.deepcopy(x, memo) for x in obj)
        elif cls is tuple or cls is frozenset:
            waiting = -key - 1
            if waiting in memo:  # a cycle back into a tuple being built
                memo[waiting].append(store)
                continue
            memo[waiting] = [store]
            building = _Building(obj)
            building.items = [None] * len(obj)
            stack.append(building)
            stack.extend((item, _setter(building.items, i)) for i, item in enumerate(obj))
        else:
            store(copy.deepcopy(obj, memo))
    return result[0]


def _setter(target: Any, index: Any) -> Callable[[Any], None]:
    def store(value: Any) -> None:
        target[index] = value

    return store
