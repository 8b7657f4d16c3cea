"""The codecs of stores that leave the process."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from statekit import Change, CodecError, JSONCodec, SignedPickleCodec, compare


@dataclasses.dataclass
class Line:
    sku: str
    qty: int = 1


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: tuple[int, ...]


@attrs.define
class Profile:
    name: str
    tags: list[str] = attrs.Factory(list)


class Color(enum.Enum):
    RED = "red"


codec = JSONCodec()


def roundtrip(value: Any) -> Any:
    return codec.decode(codec.encode(value))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**80),
        1.5,
        -0.0,
        float("inf"),
        "",
        "é\u2028",
        [1, [2, [3]]],
        {"a": 1},
        {"$weird": 1},
        {1: "int key", (1, 2): "tuple key", None: 0},
        (1, "a", (2,)),
        {1, 2},
        frozenset({"x"}),
        b"\x00\xff",
        datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc),
        datetime.date(2026, 1, 1),
        datetime.time(12, 30),
        datetime.timedelta(days=-1, seconds=5),
        uuid.UUID(int=7),
        decimal.Decimal("1.10"),
        Line("milk", 2),
        Frozen((1, 2)),
        Profile("ann", ["x"]),
        Color.RED,
        [Line("a"), {"k": Profile("b")}],
    ],
)
def test_roundtrip_is_exact(value: Any) -> None:
    assert compare(value, roundtrip(value)) is Change.SAME


def test_nan_roundtrips() -> None:
    assert compare(float("nan"), roundtrip(float("nan"))) is Change.SAME


def test_types_are_kept_apart() -> None:
    assert type(roundtrip((1,))) is tuple
    assert type(roundtrip([1])) is list
    assert roundtrip([1, 1.0, True]) == [1, 1.0, True]
    assert [type(x) for x in roundtrip([1, 1.0, True])] == [int, float, bool]


@pytest.mark.parametrize("value", [object(), {"a": [object()]}, bytearray(b"x")])
def test_unencodable_values_name_their_type(value: Any) -> None:
    with pytest.raises(CodecError, match="cannot be stored as JSON") as info:
        codec.encode(value)
    assert info.value.type_name in {"object", "bytearray"}


def test_deep_values_fail_clearly() -> None:
    value: list[Any] = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(CodecError, match="nested too deeply"):
        codec.encode(value)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b'{"$tuple": 5',
        b'{"$nope": 1}',
        b'{"$object": ["os:system", {}]}',
        b'{"$object": ["no_such_module_here:X", {}]}',
        b'{"$bytes": "!!!"}',
        b'{"$set": [[1]]}',
    ],
)
def test_bad_data_raises_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        codec.decode(data)


def test_decoding_never_imports_a_module() -> None:
    import sys

    assert "antigravity" not in sys.modules
    with pytest.raises(CodecError, match="not imported"):
        codec.decode(b'{"$object": ["antigravity:X", {}]}')
    assert "antigravity" not in sys.modules


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(max_size=10)
    | st.datetimes()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4)
        | st.frozensets(st.integers() | st.text(max_size=4), max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_roundtrip_property(value: Any) -> None:
    assert compare(value, roundtrip(value)) is Change.SAME


class TestSignedPickle:
    def test_roundtrip_of_any_picklable_value(self) -> None:
        signed = SignedPickleCodec("k" * 32)
        value = {"when": datetime.datetime(2026, 1, 1), "line": Line("x"), "raw": bytearray(b"a")}
        assert compare(value, signed.decode(signed.encode(value))) is Change.SAME

    def test_tampered_or_foreign_data_is_never_unpickled(self) -> None:
        signed = SignedPickleCodec("k" * 32)
        data = bytearray(signed.encode([1, 2]))
        data[-2] ^= 1
        with pytest.raises(CodecError, match="no valid signature"):
            signed.decode(bytes(data))
        other = SignedPickleCodec("o" * 32)
        with pytest.raises(CodecError):
            other.decode(signed.encode([1]))

    def test_rotation_reads_old_data(self) -> None:
        old = SignedPickleCodec("old" * 11)
        rotated = SignedPickleCodec(["new" * 11, "old" * 11])
        assert rotated.decode(old.encode("v")) == "v"

    def test_short_secrets_are_refused(self) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            SignedPickleCodec("short")
        assert "k" * 32 not in repr(SignedPickleCodec("k" * 32))


def test_zone_rules_are_not_silently_lost() -> None:
    import zoneinfo

    paris = datetime.datetime(2024, 3, 1, 9, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    with pytest.raises(CodecError, match="zone rules"):
        codec.encode([paris])
    assert roundtrip(paris.astimezone(datetime.timezone.utc)).tzinfo is datetime.timezone.utc
