"""Value <-> bytes, for stores that keep values outside the process.

:class:`JSONCodec` (the default) writes tagged JSON: JSON's own types as they are, and
single-key objects whose key starts with ``$`` for the rest:

==================  ===========================================
``tuple``           ``{"$tuple": [...]}``
``set``             ``{"$set": [...]}``
``frozenset``       ``{"$frozenset": [...]}``
``bytes``           ``{"$bytes": "<base64>"}``
``float`` nan/inf   ``{"$float": "nan"}``
``datetime``        ``{"$datetime": "<ISO 8601>"}`` (date, time alike;
                    ``["<ISO 8601>", 1]`` for ``fold=1``)
``timedelta``       ``{"$timedelta": [days, seconds, microseconds]}``
``UUID``            ``{"$uuid": "<hex>"}``
``Decimal``         ``{"$decimal": "<str>"}``
dataclass / attrs   ``{"$object": ["module:QualName", {field: value}]}``
enum member         ``{"$enum": ["module:QualName", value]}``
other dicts         ``{"$map": [[key, value], ...]}`` (non-str keys, or a key
                    starting with ``$``)
==================  ===========================================

Types are exact: a value of any other type (or a subclass of a builtin) cannot be
encoded and raises :class:`CodecError` naming the type. Decoding only rebuilds classes
already imported by the process and never imports a module.

:class:`SignedPickleCodec` is the opt-in for values JSON cannot carry: pickle, with an
HMAC-SHA256 signature checked before anything is unpickled.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import hmac
import json
import math
import pickle
import re
import sys
import uuid
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from .exceptions import CodecError

__all__ = [
    "Codec",
    "JSONCodec",
    "SignedPickleCodec",
    "StoredEnum",
    "StoredObject",
    "encode_with",
    "locate_unencodable",
]


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back. Implementations are thread-safe."""

    name: str

    def encode(self, value: Any) -> bytes:
        """The bytes for ``value``. Raises :class:`CodecError` if it has none."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value for ``data``. Raises :class:`CodecError` if ``data`` is invalid."""
        ...


def encode_with(codec: Codec, value: Any) -> bytes:
    """``codec.encode(value)``, a bytes-like answer (a ``memoryview`` or
    ``bytearray``, which a codec of the app's may give) made ``bytes``: stores compare
    and send bytes, and a strided view would be sent as its underlying buffer."""
    data: Any = codec.encode(value)
    if data.__class__ is memoryview or data.__class__ is bytearray:
        return bytes(data)
    return data  # type: ignore[no-any-return]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _find_class(path: object) -> type:
    """The class at ``module:QualName``, among modules already imported."""
    if not isinstance(path, str) or ":" not in path:
        raise CodecError(f"invalid class reference {path!r} in stored data")
    module_name, qualname = path.split(":", 1)
    module = sys.modules.get(module_name)
    if module is None:
        raise CodecError(
            f"stored data refers to class {path!r}, but module {module_name!r} is not "
            "imported in this process; import it before reading this state"
        )
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise CodecError(f"stored data refers to {path!r}, which is not a class here")
    return obj


_DATES: dict[type, str] = {
    datetime.datetime: "$datetime",
    datetime.date: "$date",
    datetime.time: "$time",
}


def _encode(value: Any) -> Any:
    cls = type(value)
    if cls is str or cls is int or cls is bool or value is None:
        return value
    if cls is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if cls is list:
        return [_encode(item) for item in value]
    if cls is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"$map": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if cls is tuple:
        return {"$tuple": [_encode(item) for item in value]}
    if cls is set:
        return {"$set": [_encode(item) for item in value]}
    if cls is frozenset:
        return {"$frozenset": [_encode(item) for item in value]}
    if cls is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if cls in _DATES:
        tz = getattr(value, "tzinfo", None)
        if tz is not None and type(tz) is not datetime.timezone:
            raise CodecError(
                f"a {cls.__name__} with tzinfo {type(tz).__qualname__} cannot be stored as "
                "JSON without losing its zone rules (only a fixed offset would survive); "
                "store it in UTC, or the zone name beside a naive time",
                type_name=f"{cls.__name__}[{type(tz).__qualname__}]",
            )
        if getattr(value, "fold", 0):
            return {_DATES[cls]: [value.isoformat(), 1]}
        return {_DATES[cls]: value.isoformat()}
    if cls is datetime.timedelta:
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if cls is uuid.UUID:
        return {"$uuid": value.hex}
    if cls is decimal.Decimal:
        return {"$decimal": str(value)}
    if isinstance(value, enum.Enum):
        return {"$enum": [_class_path(cls), _encode(value.value)]}
    if dataclasses.is_dataclass(value) or attrs.has(cls):
        names = (
            [f.name for f in dataclasses.fields(value)]
            if dataclasses.is_dataclass(value)
            else [a.name for a in attrs.fields(cls)]
        )
        fields = {name: _encode(getattr(value, name)) for name in names}
        return {"$object": [_class_path(cls), fields]}
    raise CodecError(
        f"a value of type {cls.__qualname__} cannot be stored as JSON; {_SUPPORTED}",
        type_name=cls.__qualname__,
    )


_SUPPORTED = (
    "store JSON-typed values (dict, list, str, int, float, bool, None), tuple, set, "
    "bytes, dates, UUID, Decimal, enums, dataclasses or attrs classes — or choose "
    "SignedPickleCodec for the store"
)


def _problem(value: Any) -> tuple[str, str] | None:
    """Why ``value`` itself (not its parts) cannot be written as tagged JSON, and the
    name of its type; None if it can."""
    cls = type(value)
    if cls is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            return (
                f"is a str holding a lone surrogate (U+{code:04X} at index {exc.start}), "
                "which UTF-8 cannot encode; such text usually comes from decoding bad "
                "input with errors='surrogateescape' or from JSON with a lone \\u escape: "
                "clean it before storing",
                "str",
            )
        return None
    if cls is int:
        try:
            repr(value)
        except ValueError:
            limit = sys.get_int_max_str_digits()
            return (
                f"is an int of more than {limit} digits, which Python will not write as "
                "text (sys.set_int_max_str_digits); store it as bytes or a str",
                "int",
            )
        return None
    if cls is bool or value is None or cls is float or cls in _CONTAINER_TYPES:
        return None
    if cls in (bytes, datetime.timedelta, uuid.UUID, decimal.Decimal):
        return None
    if cls in _DATES:
        tz = getattr(value, "tzinfo", None)
        if tz is not None and type(tz) is not datetime.timezone:
            return (
                f"is a {cls.__name__} with tzinfo {type(tz).__qualname__}, which JSON "
                "cannot keep without losing its zone rules (only a fixed offset would "
                "survive); store it in UTC, or the zone name beside a naive time",
                f"{cls.__name__}[{type(tz).__qualname__}]",
            )
        return None
    if isinstance(value, enum.Enum) or dataclasses.is_dataclass(value) or attrs.has(cls):
        return None
    return (
        f"is of type {cls.__qualname__}, which cannot be stored as JSON; {_SUPPORTED}",
        cls.__qualname__,
    )


_CONTAINER_TYPES = (list, dict, tuple, set, frozenset)


# Keys shown as they are in a path: short words, such as field names. Anything else
# (ids, tokens, card numbers: keys may be user data, even secrets) is shown by its
# position among the dict's keys.
_PLAIN_KEY = re.compile(r"[A-Za-z][A-Za-z_.-]{0,23}")


def _key_text(key: Any, position: int) -> str | None:
    """How a dict key is shown in a path (``['name']``, ``[3]``), or None to show its
    position instead."""
    if type(key) is str and _PLAIN_KEY.fullmatch(key):
        return repr(key)
    if (type(key) is int and -1000 < key < 1000) or type(key) is bool or key is None:
        return repr(key)
    return None


def _children(value: Any) -> list[tuple[str, Any]]:
    """The parts of ``value`` the encoder writes, each with its step of a path."""
    cls = type(value)
    if cls is list or cls is tuple:
        return [(f"[{i}]", item) for i, item in enumerate(value)]
    if cls is set or cls is frozenset:
        return [(f" (member {i} of the {cls.__name__})", item) for i, item in enumerate(value)]
    if cls is dict:
        out: list[tuple[str, Any]] = []
        for i, (key, item) in enumerate(value.items()):
            text = _key_text(key, i)
            out.append((f" (key {i} of the dict)", key))
            out.append((f"[{text}]" if text else f" (under key {i} of the dict)", item))
        return out
    if isinstance(value, enum.Enum):
        return [(".value", value.value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    if attrs.has(cls):
        return [(f".{a.name}", getattr(value, a.name)) for a in attrs.fields(cls)]
    return []


def locate_unencodable(value: Any) -> tuple[str, str, str] | None:
    """The first part of ``value`` that tagged JSON cannot carry: its path (a Python
    expression relative to the value, ``""`` for the value itself), why, and its type's
    name; None when every part can be written.

    Walks without recursion, so a deep value cannot overflow the stack, and visits each
    object once, so shared parts and cycles end.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    seen: set[int] = set()
    while stack:
        path, item = stack.pop()
        problem = _problem(item)
        if problem is not None:
            return path, problem[0], problem[1]
        if id(item) in seen:
            continue
        seen.add(id(item))
        # Reversed, so that the first part in writing order is found first.
        stack.extend((path + step, child) for step, child in reversed(_children(item)))
    return None


@attrs.frozen
class StoredObject:
    """A dataclass or attrs instance as it was stored, for a state's ``migrate``:
    its class's ``"module:QualName"`` and its fields by name, whether or not that class
    still exists (or still has those fields).

    Attributes:
        type: where the class was, ``"module:QualName"``.
        fields: the stored fields by name (values decoded the same way).
    """

    type: str
    fields: dict[str, Any]


@attrs.frozen
class StoredEnum:
    """An enum member as it was stored, for a state's ``migrate``.

    Attributes:
        type: where the enum class was, ``"module:QualName"``.
        value: the member's value.
    """

    type: str
    value: Any


def _tagged(items: Sequence[Any], as_stored: bool = False) -> Any:
    """Decode one single-key tagged object, given as its (tag, payload) item; with
    ``as_stored``, objects and enum members as :class:`StoredObject` and
    :class:`StoredEnum` (no class is looked up)."""
    tag, payload = items[0]
    if as_stored and tag == "$object":
        path, fields = payload
        if not isinstance(path, str) or not isinstance(fields, dict):
            raise CodecError(f"invalid stored object {payload!r}")
        return StoredObject(path, fields)
    if as_stored and tag == "$enum":
        path, raw = payload
        if not isinstance(path, str):
            raise CodecError(f"invalid stored enum member {payload!r}")
        return StoredEnum(path, raw)
    if tag == "$tuple":
        return tuple(payload)
    if tag == "$set":
        return set(payload)
    if tag == "$frozenset":
        return frozenset(payload)
    if tag == "$map":
        return dict(payload)
    if tag == "$bytes":
        return base64.b64decode(payload, validate=True)
    if tag == "$float":
        return float(payload)
    if tag == "$datetime":
        return _with_fold(datetime.datetime.fromisoformat, payload)
    if tag == "$date":
        return datetime.date.fromisoformat(payload)
    if tag == "$time":
        return _with_fold(datetime.time.fromisoformat, payload)
    if tag == "$timedelta":
        days, seconds, micros = payload
        return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
    if tag == "$uuid":
        return uuid.UUID(hex=payload)
    if tag == "$decimal":
        return decimal.Decimal(payload)
    if tag == "$enum":
        path, raw = payload
        return _find_class(path)(raw)
    if tag == "$object":
        path, fields = payload
        cls = _find_class(path)
        if not (dataclasses.is_dataclass(cls) or attrs.has(cls)):
            raise CodecError(f"stored class {path!r} is not a dataclass or attrs class")
        return _rebuild(cls, fields)
    raise CodecError(f"unknown tag {tag!r} in stored data")


def _with_fold(parse: Any, payload: Any) -> Any:
    """A datetime or time from ISO text, with ``fold=1`` when it was stored as
    ``[text, 1]`` (ISO 8601 cannot say which of two repeated wall times is meant)."""
    if isinstance(payload, list):
        return parse(payload[0]).replace(fold=1)
    return parse(payload)


def _rebuild(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of ``cls`` with exactly ``fields``, whatever its ``__init__`` takes."""
    obj: Any = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(obj, name, value)  # also for frozen classes
    return obj


def _object_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        items = list(obj.items())
        if items[0][0].startswith("$"):
            return _tagged(items)
    return obj


def _stored_hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        items = list(obj.items())
        if items[0][0].startswith("$"):
            return _tagged(items, as_stored=True)
    return obj


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(object_hook=_object_hook)
_STORED_DECODER = json.JSONDecoder(object_hook=_stored_hook)


class JSONCodec:
    """Tagged JSON (the default for stores that leave the process). Thread-safe."""

    name = "json"

    def encode(self, value: Any) -> bytes:
        """The tagged JSON of ``value``, as UTF-8 bytes.

        Raises:
            CodecError: a type JSON cannot carry and the codec does not tag, naming it
                and where it sits in the value.
        """
        try:
            return _ENCODER.encode(_encode(value)).encode("utf-8")
        except RecursionError:
            raise CodecError(
                "the value is nested too deeply to store as JSON; flatten it, or keep "
                "it in the memory store"
            ) from None
        except (CodecError, ValueError, UnicodeError) as exc:
            # A type JSON cannot carry, a lone surrogate UTF-8 cannot encode, an int
            # too long to write as text: say where inside the value it sits.
            found = locate_unencodable(value)
            if found is None:  # pragma: no cover - every failure above is found
                raise CodecError(f"the value cannot be stored as JSON ({exc})") from exc
            where, why, type_name = found
            subject = where if where and not where.startswith(" ") else f"the value{where}"
            raise CodecError(
                f"{subject} {why}", type_name=type_name, where=where, detail=why
            ) from None

    def decode(self, data: bytes) -> Any:
        """The value ``encode`` made ``data`` from (classes imported by their path).

        Raises:
            CodecError: ``data`` is not tagged JSON this codec wrote, or names a class
                that no longer exists.
        """
        return self._decode(_DECODER, data)

    def decode_stored(self, data: bytes) -> Any:
        """``data`` as stored, for a state's ``migrate``: as :meth:`decode`, but with
        dataclass and attrs instances as :class:`StoredObject` and enum members as
        :class:`StoredEnum`, so that a class a deploy moved, renamed or changed is
        still read (no class is looked up)."""
        return self._decode(_STORED_DECODER, data)

    @staticmethod
    def _decode(decoder: json.JSONDecoder, data: bytes) -> Any:
        try:
            return decoder.decode(data.decode("utf-8"))
        except CodecError:
            raise
        except (
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            RecursionError,
            AttributeError,
        ) as exc:
            raise CodecError(f"stored data is not valid tagged JSON ({exc})") from exc


class SignedPickleCodec:
    """Pickle with an HMAC-SHA256 signature: for values JSON cannot carry.

    Only data signed with one of ``secrets`` is ever unpickled, so a party that can
    write to the store but does not know a secret cannot make the process run code.
    Give the same secrets to every process; to rotate, put the new secret first.

    Args:
        secrets: one or more secrets (bytes or str, at least 32 bytes), newest first.
    """

    name = "signed-pickle"

    def __init__(self, secrets: Sequence[bytes | str] | bytes | str) -> None:
        if isinstance(secrets, (bytes, str)):
            secrets = [secrets]
        keys = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in secrets]
        if not keys or any(len(k) < 32 for k in keys):
            raise ValueError(
                "SignedPickleCodec needs one or more secrets of at least 32 bytes, newest "
                "first; generate one with secrets.token_bytes(32)"
            )
        self._keys = keys

    def __repr__(self) -> str:
        return f"SignedPickleCodec(<{len(self._keys)} secret(s)>)"

    def encode(self, value: Any) -> bytes:
        """``value`` pickled, signed with the newest key.

        Raises:
            CodecError: the value cannot be pickled.
        """
        try:
            data = pickle.dumps(value, protocol=5)
        except Exception as exc:
            raise CodecError(
                f"a value of type {type(value).__qualname__} cannot be pickled ({exc})",
                type_name=type(value).__qualname__,
            ) from exc
        return hmac.new(self._keys[0], data, hashlib.sha256).digest() + data

    def decode(self, data: bytes) -> Any:
        """The value, unpickled only once its signature holds under one of the keys.

        Raises:
            CodecError: the signature holds under no key (nothing is unpickled).
        """
        signature, body = data[:32], data[32:]
        for key in self._keys:
            if hmac.compare_digest(signature, hmac.new(key, body, hashlib.sha256).digest()):
                try:
                    return pickle.loads(body)
                except Exception as exc:  # a class moved or removed by a deploy, say
                    raise CodecError(
                        f"a stored pickle no longer loads ({type(exc).__name__}; its "
                        "class may have moved)"
                    ) from exc
        raise CodecError(
            "stored pickle has no valid signature; it was written with another secret "
            "or tampered with, and was not unpickled"
        )
