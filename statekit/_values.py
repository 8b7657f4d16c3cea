"""How the engine turns values into what its store keeps, and back.

Two policies, chosen by the store:

- :class:`ObjectValues`, for a store that keeps Python objects (the memory store): an
  atom as it is, else a sealed image, else a private deep copy (``_copying.py``);
- :class:`EncodedValues`, for a store that keeps bytes (SQLite, Redis): the store's
  codec's encoding.

Either way the stored form doubles as the snapshot of change detection: a value whose
new stored form equals the old one has not changed, and the exact walk runs only when
they differ.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._changes import CHANGED, EXACT_ATOMS, SAME, Change, _walk, judge
from ._codec import Codec, CodecError
from ._copying import open_value, stored_form
from .exceptions import StateNotCopyable, ValueNotStorable

__all__ = ["EncodedValues", "ObjectValues", "ValuePolicy", "policy_for"]


class ValuePolicy(Protocol):
    #: Types whose values the policy stores as they are and judges by ``type`` and
    #: ``==`` alone, so that an event may judge them without calling :meth:`judge`.
    exact_atoms: frozenset[type]

    def open(self, stored: Any) -> Any:
        """A private copy of the value kept as ``stored``."""
        ...

    def store(self, name: str, value: Any) -> Any:
        """What to keep for ``value`` of state ``name``; raises naming the state."""
        ...

    def judge(self, name: str, stored: Any, value: Any) -> tuple[Change, Any]:
        """The verdict for ``value`` against ``stored``, and the new stored form when
        the verdict is not SAME."""
        ...


class ObjectValues:
    """Values kept as Python objects: atoms, sealed images or private copies."""

    exact_atoms = EXACT_ATOMS
    open = staticmethod(open_value)

    def store(self, name: str, value: Any) -> Any:
        try:
            return stored_form(value)
        except Exception as exc:
            raise StateNotCopyable(name, type(value).__qualname__, exc) from exc

    def judge(self, name: str, stored: Any, value: Any) -> tuple[Change, Any]:
        try:
            verdict, image = judge(stored, value)
        except Exception:  # the stored value no longer opens (a class moved): replace it
            verdict, image = CHANGED, None
        if verdict is SAME:
            return verdict, None
        try:
            return verdict, stored_form(value, image)
        except Exception as exc:
            raise StateNotCopyable(name, type(value).__qualname__, exc) from exc


class EncodedValues:
    """Values kept as bytes by a codec."""

    exact_atoms: frozenset[type] = frozenset()

    def __init__(self, codec: Codec, store_name: str) -> None:
        self.codec = codec
        self.store_name = store_name

    def open(self, stored: Any) -> Any:
        return self.codec.decode(stored)

    def store(self, name: str, value: Any) -> Any:
        try:
            return self.codec.encode(value)
        except CodecError as exc:
            raise ValueNotStorable(name, exc.type_name, self.store_name, str(exc)) from exc

    def judge(self, name: str, stored: Any, value: Any) -> tuple[Change, Any]:
        data = self.store(name, value)
        if data == stored:
            return SAME, None
        try:
            before = self.codec.decode(stored)
        except CodecError:  # the stored value no longer decodes (a class moved): replace it
            return CHANGED, data
        verdict = _walk(before, value)
        return verdict, (None if verdict is SAME else data)


def policy_for(codec: Codec | None, store_name: str) -> ValuePolicy:
    """The policy for a store with ``codec`` (None: it keeps Python objects)."""
    return ObjectValues() if codec is None else EncodedValues(codec, store_name)
