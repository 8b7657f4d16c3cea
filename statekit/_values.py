"""How the engine turns values into what its store keeps, and back.

Two policies, chosen by the store:

- :class:`ObjectValues`, for a store that keeps Python objects (the memory store): an
  atom as it is, else a sealed image, else a private deep copy (``_copying.py``);
- :class:`EncodedValues`, for a store that keeps bytes (SQLite, Redis): the store's
  codec's encoding;
- :class:`CheckedObjectValues`, for a memory store asked to check every value written
  with a shared store's codec (``MemoryStore(check_values=JSONCodec())``), so that a
  value a shared store would refuse is refused during development too.

Either way the stored form doubles as the snapshot of change detection: a value whose
new stored form equals the old one has not changed, and the exact walk runs only when
they differ.

**Versions.** A state declared with ``version=N`` (N > 1) stores its values as
:data:`VERSION_MARK`, ``N`` in decimal, a NUL, then the codec's bytes; a value of version
1 is the codec's bytes alone, as every value was before versions, so that data written
earlier reads as version 1 and needs no change. (JSON never starts with a NUL, and a
signed pickle does so with that whole mark with odds of one in 2**96.) A store that
keeps Python objects keeps no versions: its values do not outlive the process.
"""

from __future__ import annotations

from typing import Any, Protocol

from typing_extensions import override

from ._changes import CHANGED, EXACT_ATOMS, SAME, Change, judge, walk
from ._codec import Codec, encode_with
from ._copying import open_value, stored_form
from .exceptions import CodecError, StateNotCopyable, ValueNotStorable

__all__ = [
    "VERSION_MARK",
    "CheckedObjectValues",
    "EncodedValues",
    "ObjectValues",
    "ValuePolicy",
    "not_storable",
    "policy_for",
    "unreadable",
]


#: The start of a stored value of version 2 or more (see Versions above).
VERSION_MARK = b"\x00statekit-v"


def with_version(data: bytes, version: int) -> bytes:
    """``data`` (a codec's bytes) marked as a value of ``version``."""
    return data if version == 1 else b"%b%d\x00%b" % (VERSION_MARK, version, data)


def split_version(stored: bytes) -> tuple[int, bytes]:
    """The version of a stored value and the codec's bytes.

    Raises:
        CodecError: a mark with no version after it.
    """
    if not stored.startswith(VERSION_MARK):
        return 1, stored
    end = stored.find(b"\x00", len(VERSION_MARK))
    digits = stored[len(VERSION_MARK) : end]
    if end < 0 or not digits.isdigit() or len(digits) > 9:
        raise CodecError("stored data has a damaged version mark")
    return int(digits), stored[end + 1 :]


def not_storable(name: str, store: str, exc: CodecError) -> ValueNotStorable:
    """The error for a value of state ``name`` that ``store``'s codec refused."""
    # "cart[3]['name'] is a str holding ...": the state, the path, what is wrong.
    detail = str(exc) if exc.where is None else f"{name}{exc.where} {exc.detail}"
    return ValueNotStorable(name, exc.type_name, store, detail, where=exc.where)


def unreadable(name: str, kind: str, exc: Exception) -> CodecError:
    """The error for a stored value of state ``name`` that no longer opens."""
    cause = str(exc) if isinstance(exc, CodecError) else f"{type(exc).__name__}: {exc}"
    error = CodecError(
        f"the stored value of {kind} state {name!r} cannot be read ({cause}); writing a "
        "new value replaces it",
        state=name,
    )
    error.__cause__ = exc
    return error


class ValuePolicy(Protocol):
    #: Types whose values the policy stores as they are and judges by ``type`` and
    #: ``==`` alone, so that an event may judge them without calling :meth:`judge`.
    exact_atoms: frozenset[type]
    #: The version of each state declared with one above 1, by name.
    versions: dict[str, int]

    def open(self, stored: Any) -> Any:
        """A private copy of the value kept as ``stored`` (whatever its version)."""
        ...

    def version_of(self, stored: Any) -> int:
        """The version ``stored`` was written with; 0 for a policy that keeps no
        versions (its values are always the current code's)."""
        ...

    def open_stored(self, stored: Any) -> Any:
        """The value kept as ``stored``, for a ``migrate``: what the codec can read of
        it whatever classes exist now (``JSONCodec.decode_stored``)."""
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
    open_stored = staticmethod(open_value)

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}

    def version_of(self, stored: Any) -> int:
        """0: objects kept in the process outlive no deploy."""
        return 0

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
        self.versions: dict[str, int] = {}

    def open(self, stored: Any) -> Any:
        if stored[:1] == b"\x00":
            return self.codec.decode(split_version(stored)[1])
        return self.codec.decode(stored)

    def version_of(self, stored: Any) -> int:
        return 1 if stored[:1] != b"\x00" else split_version(stored)[0]

    def open_stored(self, stored: Any) -> Any:
        data = split_version(stored)[1]
        decode_stored = getattr(self.codec, "decode_stored", None)
        return self.codec.decode(data) if decode_stored is None else decode_stored(data)

    def store(self, name: str, value: Any) -> Any:
        try:
            data = encode_with(self.codec, value)
        except CodecError as exc:
            raise not_storable(name, self.store_name, exc) from exc
        if self.versions:
            return with_version(data, self.versions.get(name, 1))
        return data

    def judge(self, name: str, stored: Any, value: Any) -> tuple[Change, Any]:
        data = self.store(name, value)
        if data == stored:
            return SAME, None
        try:
            if self.versions and self.version_of(stored) != self.versions.get(name, 1):
                # Stored by another version: equal as raw data is no equal value (the
                # stored one would be migrated again when read).
                return CHANGED, data
            before = self.open(stored)
        except Exception:  # the stored value no longer decodes (a class moved): replace it
            return CHANGED, data
        verdict = walk(before, value)
        return verdict, (None if verdict is SAME else data)


class CheckedObjectValues(ObjectValues):
    """Values kept as Python objects, each written value also checked with a codec.

    Every value goes through :meth:`judge` or :meth:`store` (no atom is judged inline),
    so that a str or an int the codec refuses is caught too.
    """

    exact_atoms: frozenset[type] = frozenset()

    def __init__(self, codec: Codec, store_name: str) -> None:
        super().__init__()
        self.codec = codec
        self.store_name = store_name

    def _check(self, name: str, value: Any) -> None:
        try:
            self.codec.encode(value)
        except CodecError as exc:
            raise not_storable(
                name, f"{self.store_name} (checked with {self.codec.name})", exc
            ) from exc

    @override
    def store(self, name: str, value: Any) -> Any:
        self._check(name, value)
        return super().store(name, value)

    @override
    def judge(self, name: str, stored: Any, value: Any) -> tuple[Change, Any]:
        verdict, form = super().judge(name, stored, value)
        if verdict is not SAME:
            self._check(name, value)
        return verdict, form


def policy_for(codec: Codec | None, store_name: str, check: Codec | None = None) -> ValuePolicy:
    """The policy for a store with ``codec`` (None: it keeps Python objects, checked
    with ``check`` if given)."""
    if codec is not None:
        return EncodedValues(codec, store_name)
    return ObjectValues() if check is None else CheckedObjectValues(check, store_name)
