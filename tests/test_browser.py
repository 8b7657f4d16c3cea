"""Browser state tokens: round trips, every failure reason, rotation, binding, expiry,
and a fuzz of 100,000 random and mutated tokens that never raises."""

from __future__ import annotations

import datetime
import itertools
import random
import string
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statekit import Change, CodecError, JSONCodec, TokenTooLarge, compare
from statekit._browser import BrowserKeys, TokenProblem, _b64, _unb64

SECRET = "s" * 32
OLD = "o" * 32
keys = BrowserKeys([SECRET])
signed = BrowserKeys([SECRET], encrypt=False)
compressed = BrowserKeys([SECRET], compress=True)
B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def roundtrip(value: Any, k: BrowserKeys = keys) -> Any:
    token = k.encode(value, storage_key="login", now=100)
    decoded = k.decode(token, storage_key="login", now=101)
    assert decoded.problem is None
    return decoded.value


@pytest.mark.parametrize(
    "value",
    [
        ["", ""],
        "",
        0,
        0.0,
        False,
        None,
        [],
        {},
        ["ann", "pw"],
        {"theme": "dark", "n": 3, "tags": ("a", "b"), "seen": {1, 2}},
        datetime.datetime(2026, 11, 25, tzinfo=datetime.timezone.utc),
        "é" * 50,
        "  trailing spaces  ",
        ["a" * 500],
    ],
)
@pytest.mark.parametrize(
    "k", [keys, signed, compressed], ids=["encrypted", "signed", "encrypted-compressed"]
)
def test_every_json_typed_value_roundtrips_falsy_ones_too(value: Any, k: BrowserKeys) -> None:
    assert compare(value, roundtrip(value, k)) is Change.SAME


def test_tokens_are_url_safe_opaque_and_unique() -> None:
    first = keys.encode(["ann", "hunter2"], storage_key="login", now=1)
    second = keys.encode(["ann", "hunter2"], storage_key="login", now=1)
    assert first != second  # a fresh nonce each time
    assert set(first) <= set(string.ascii_letters + string.digits + "-_.")
    assert "hunter2" not in first
    assert SECRET not in first


def test_signed_tokens_are_readable_but_not_forgeable() -> None:
    token = signed.encode(["ann"], storage_key="login", now=1)
    assert token.startswith("sk1s.")
    body = token.split(".")[3]
    tampered = token.replace(body, body[:-2] + ("AA" if body[-2:] != "AA" else "BB"))
    assert signed.decode(tampered, storage_key="login", now=2).problem is TokenProblem.TAMPERED


def test_each_failure_reason() -> None:
    good = keys.encode({"a": 1}, storage_key="login", now=100, ttl=10)

    def problem(token: object, **kw: Any) -> TokenProblem | None:
        args: dict[str, Any] = {"storage_key": "login", "now": 101, **kw}
        return keys.decode(token, **args).problem

    body = good.split(".")[3]
    flipped = good[: -len(body)] + body[:5] + ("A" if body[5] != "A" else "B") + body[6:]
    foreign = BrowserKeys(["x" * 32]).encode({"a": 1}, storage_key="login", now=100)
    assert problem(None) is TokenProblem.MISSING
    assert problem("") is TokenProblem.MISSING
    assert problem(12) is TokenProblem.MALFORMED
    assert problem("garbage") is TokenProblem.MALFORMED
    assert problem(good[:20]) is TokenProblem.MALFORMED
    assert problem(good.replace("sk1.", "sk1s.", 1)) is TokenProblem.MALFORMED
    assert problem(foreign) is TokenProblem.UNKNOWN_KEY
    assert problem(good, storage_key="other") is TokenProblem.WRONG_STORAGE_KEY
    assert problem(flipped) is TokenProblem.TAMPERED
    assert problem(good, now=110) is TokenProblem.EXPIRED
    assert problem(good, max_bytes=10) is TokenProblem.OVERSIZED
    assert problem(good) is None


def test_authentic_payload_that_is_not_json_is_reported() -> None:
    import os

    key = keys._keys[0]
    where = keys._where(key, "login", "")
    aad = f"sk1.{key.kid}.{where}.login\0".encode()
    nonce = os.urandom(12)
    sealed = nonce + key.aead.encrypt(nonce, b"jnot json", aad)
    token = f"sk1.{key.kid}.{where}.{_b64(sealed)}"
    assert keys.decode(token, storage_key="login", now=1).problem is TokenProblem.NOT_JSON


def test_rotation_reads_old_tokens_and_asks_for_reencoding() -> None:
    old_keys = BrowserKeys([OLD])
    rotated = BrowserKeys([SECRET, OLD])
    old_token = old_keys.encode(["ann"], storage_key="login", now=1)
    decoded = rotated.decode(old_token, storage_key="login", now=2)
    assert decoded.value == ["ann"]
    assert decoded.reencode
    fresh = rotated.encode(["ann"], storage_key="login", now=2)
    assert not rotated.decode(fresh, storage_key="login", now=3).reencode
    assert BrowserKeys([SECRET]).decode(fresh, storage_key="login", now=3).value == ["ann"]
    retired = BrowserKeys([SECRET]).decode(old_token, storage_key="login", now=3)
    assert retired.problem is TokenProblem.UNKNOWN_KEY


def test_binding_to_a_user() -> None:
    token = keys.encode(["x"], storage_key="prefs", now=1, bind="user-1")
    assert keys.decode(token, storage_key="prefs", now=2, bind="user-1").value == ["x"]
    other = keys.decode(token, storage_key="prefs", now=2, bind="user-2")
    assert other.problem is TokenProblem.WRONG_STORAGE_KEY
    assert "user-1" not in token


def test_size_budget_is_checked_at_encode_time_naming_the_state() -> None:
    with pytest.raises(TokenTooLarge, match=r"'notes'.*over its budget of 200") as info:
        keys.encode(os_random_text(5000), storage_key="n", now=1, state="notes", max_bytes=200)
    assert info.value.size > 200


def test_compression_keeps_repetitive_values_small_where_it_reveals_nothing() -> None:
    """Signed tokens are compressed by default; encrypted ones only when asked.

    Fails if signed tokens stop being compressed, or if encrypted ones are compressed
    without ``compress=True`` (which made their length a leak).
    """
    value = ["a" * 4000]

    def size(k: BrowserKeys) -> int:
        return len(k.encode(value, storage_key="n", now=1))

    assert size(signed) < 300
    assert size(compressed) < 300
    assert size(keys) > 4000
    assert size(BrowserKeys([SECRET], encrypt=False, compress=False)) > 4000


def issued(k: BrowserKeys, fits: Callable[[str], bool]) -> str:
    """A token of ``k`` whose body text ``fits``: values (and nonces) vary until one does."""
    letters = os_random_text(300, string.ascii_letters)
    for n in range(10_000):
        token = k.encode(letters[: n % 300], storage_key="login", now=100)
        if fits(token.split(".")[3]):
            return token
    raise AssertionError("no token fits")  # pragma: no cover


def flip_unused_bit(body: str) -> str:
    # A body of 4n+2 or 4n+3 characters leaves 4 or 2 low bits of its last one unused.
    return body[:-1] + B64[B64.index(body[-1]) ^ 1]


def insert_non_alphabet(body: str) -> str:
    # At a length of 4n a lenient decoder skips the character and needs no padding.
    return body[:5] + "!" + body[5:]


def standard_alphabet(body: str) -> str:
    return body.replace("-", "+").replace("_", "/")


RESPELLINGS: dict[str, tuple[Callable[[str], bool], Callable[[str], str]]] = {
    "unused-bits-flipped": (lambda body: len(body) % 4 != 0, flip_unused_bit),
    "non-alphabet-inserted": (lambda body: len(body) % 4 == 0, insert_non_alphabet),
    "trailing-padding": (lambda body: True, lambda body: body + "="),
    "double-padding": (lambda body: True, lambda body: body + "=="),
    "plus-slash-alphabet": (lambda body: "-" in body and "_" in body, standard_alphabet),
}


@pytest.mark.parametrize("respelling", RESPELLINGS)
@pytest.mark.parametrize("k", [keys, signed], ids=["encrypted", "signed"])
def test_only_the_issued_spelling_of_a_token_decodes(k: BrowserKeys, respelling: str) -> None:
    """Another spelling of the same bytes is malformed, so a token string is canonical.

    Fails if base64 is decoded leniently (as ``urlsafe_b64decode`` alone does): each of
    these respellings then decodes to the issued value.
    """
    fits, respell = RESPELLINGS[respelling]
    token = issued(k, fits)
    body = token.split(".")[3]
    other = token[: -len(body)] + respell(body)
    assert other != token
    assert k.decode(token, storage_key="login", now=101).problem is None
    decoded = k.decode(other, storage_key="login", now=101)
    assert decoded.problem is TokenProblem.MALFORMED
    assert decoded.value is None


def test_base64_reads_only_what_it_writes() -> None:
    """Fails if ``_unb64`` accepts any text ``_b64`` would not have written."""
    for data in (b"", b"\x00", b"\xff\xfe", b"abc", b"\xfb\xff\xbf"):
        assert _unb64(_b64(data)) == data
    for text in ("AB", "AAB", "AA==", "+/8", "Zm9v\n", "Zm 9v", "Zm9v.", "A"):
        with pytest.raises(ValueError, match="canonical"):
            _unb64(text)


@pytest.mark.parametrize("k", [keys, signed], ids=["encrypted", "signed"])
def test_kid_and_where_are_compared_exactly(k: BrowserKeys) -> None:
    """A kid or a where in another case, or padded, is refused.

    Fails if the kid were looked up, or the where compared, after normalising case or
    stripping padding or spaces. (This already held: it pins that down.)
    """
    token = k.encode(["ann"], storage_key="login", now=100)
    prefix, kid, where, body = token.split(".")

    def problem(kid_text: str, where_text: str) -> TokenProblem | None:
        respelled = f"{prefix}.{kid_text}.{where_text}.{body}"
        return k.decode(respelled, storage_key="login", now=101).problem

    assert problem(kid, where) is None
    for changed in (kid.swapcase(), kid.lower(), kid.upper(), kid + "=", kid + "==", f" {kid}"):
        if changed != kid:
            assert problem(changed, where) is TokenProblem.UNKNOWN_KEY, changed
    for changed in (where.swapcase(), where + "=", where + "==", f"{where} "):
        if changed != where:
            assert problem(kid, changed) is TokenProblem.WRONG_STORAGE_KEY, changed


def test_encrypted_token_length_does_not_reveal_a_secret_by_compression() -> None:
    """CRIME/BREACH: an attacker who puts text beside a secret in one value and sees the
    token's length guesses the secret's next character by the shortest token.

    Signed tokens, compressed, show that the oracle is real here (signed tokens reveal
    the value anyway). Fails if default encrypted tokens are compressed: the right
    guess then gives a shorter token, as it did before compression became opt-in.
    """
    secret = "tok_Qx7vRm2Lp9"
    known = "tok_Qx7v"  # what the attacker has so far; the next character is "R"
    guesses = string.ascii_letters + string.digits

    def lengths(k: BrowserKeys) -> dict[str, int]:
        values = {guess: {"api_token": secret, "note": known + guess} for guess in guesses}
        return {g: len(k.encode(v, storage_key="s", now=1)) for g, v in values.items()}

    oracle = lengths(signed)
    assert [g for g, n in oracle.items() if n == min(oracle.values())] == ["R"]
    assert len(set(lengths(keys).values())) == 1
    assert not keys.compress


def test_encrypted_token_length_steps_every_32_bytes_of_payload() -> None:
    """An encrypted body is padded to a multiple of 32 bytes, so the token's length is a
    step function of the payload's: 32 payload sizes in a row give one token length.

    Fails if bodies are not padded (the length then follows the payload byte by byte)
    or are compressed.
    """
    text = os_random_text(32 * 8, string.ascii_letters)
    codec = JSONCodec()
    payload_sizes, token_sizes, sealed_sizes = [], [], set()
    for n in range(len(text) + 1):
        token = keys.encode(text[:n], storage_key="s", now=1)
        payload_sizes.append(len(codec.encode({"v": text[:n], "iat": 1, "exp": None})))
        token_sizes.append(len(token))
        sealed_sizes.add(len(_unb64(token.split(".")[3])))
    assert payload_sizes == list(range(payload_sizes[0], payload_sizes[0] + len(text) + 1))
    assert token_sizes == sorted(token_sizes)
    steps = [n for n in range(1, len(token_sizes)) if token_sizes[n] != token_sizes[n - 1]]
    assert len(steps) >= 7
    assert all(b - a == 32 for a, b in itertools.pairwise(steps))
    for n in steps:  # a step is the body crossing 32 bytes: tag byte + payload
        assert (1 + payload_sizes[n]) % 32 == 1
    assert all((size - 12 - 16) % 32 == 0 for size in sealed_sizes)  # nonce, tag


def test_compress_opt_in_still_compresses_and_is_documented_as_a_leak() -> None:
    """``compress=True`` makes repetitive values small, and both the docstring and
    docs/browser.md say what it risks.

    Fails if the option is gone or ignored, or the warning is dropped from either.
    """
    value = {"notes": ["same line"] * 500}
    assert compressed.compress
    small = compressed.encode(value, storage_key="s", now=1)
    assert len(small) * 10 < len(keys.encode(value, storage_key="s", now=1))
    assert compressed.decode(small, storage_key="s", now=2).value == value
    assert keys.decode(small, storage_key="s", now=2).value == value  # any keys read it
    warning = "Never put secrets and attacker-influenced text in one compressed value"
    assert warning in " ".join((BrowserKeys.__doc__ or "").split())
    page = Path(__file__).resolve().parent.parent / "docs" / "browser.md"
    text = " ".join(page.read_text(encoding="utf-8").split())
    assert "## What a token's length reveals" in text
    assert warning.lower() in text.lower()


def test_tokens_with_an_unpadded_body_of_earlier_versions_still_decode() -> None:
    """Encrypted tokens were once compressed by default (a ``z`` body) and never padded:
    authentic ones still read. Fails if decoding demands padding or drops ``z`` bodies.
    """
    import os

    key = keys._keys[0]
    where = keys._where(key, "login", "")
    aad = f"sk1.{key.kid}.{where}.login\0".encode()
    payload = JSONCodec().encode({"v": ["ann", "a" * 300], "iat": 1, "exp": None})
    for body in (b"z" + zlib.compress(payload, 6), b"j" + payload):
        nonce = os.urandom(12)
        sealed = nonce + key.aead.encrypt(nonce, body, aad)
        token = f"sk1.{key.kid}.{where}.{_b64(sealed)}"
        assert keys.decode(token, storage_key="login", now=2).value == ["ann", "a" * 300]


def test_non_json_values_fail_at_encode_time() -> None:
    with pytest.raises(CodecError, match="object"):
        keys.encode(object(), storage_key="n", now=1)


def test_keys_need_real_secrets_and_never_show_them() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        BrowserKeys("short")
    with pytest.raises(ValueError, match="32 bytes"):
        BrowserKeys([])
    assert SECRET not in repr(keys)


def test_ephemeral_keys_warn_that_values_die_with_the_process() -> None:
    with pytest.warns(RuntimeWarning, match="restart"):
        ephemeral = BrowserKeys.ephemeral()
    token = ephemeral.encode(1, storage_key="k", now=1)
    assert ephemeral.decode(token, storage_key="k", now=2).value == 1
    with pytest.warns(RuntimeWarning):
        other_process = BrowserKeys.ephemeral()
    assert other_process.decode(token, storage_key="k", now=2).problem is TokenProblem.UNKNOWN_KEY


def test_ephemeral_keys_chosen_on_purpose_do_not_warn() -> None:
    # pytest turns warnings into errors here: a warning from warn=False fails this test.
    keys = BrowserKeys.ephemeral(warn=False)
    token = keys.encode("v", storage_key="k", now=1)
    assert keys.decode(token, storage_key="k", now=2).value == "v"


def os_random_text(n: int, alphabet: str = string.printable) -> str:
    rng = random.Random(7)
    return "".join(rng.choice(alphabet) for _ in range(n))


def mutate(token: str, rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0 and token:  # flip a character
        i = rng.randrange(len(token))
        return token[:i] + rng.choice(string.printable) + token[i + 1 :]
    if kind == 1:  # truncate
        return token[: rng.randrange(len(token) + 1)]
    if kind == 2:  # extend
        return token + "".join(
            rng.choice(string.ascii_letters) for _ in range(rng.randrange(1, 9))
        )
    if kind == 3:  # swap parts
        parts = token.split(".")
        rng.shuffle(parts)
        return ".".join(parts)
    if kind == 4:  # random bytes as text
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 80)))
    return "sk1." + ".".join(
        "".join(rng.choice(string.ascii_letters + "-_") for _ in range(rng.randrange(0, 20)))
        for _ in range(3)
    )


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.sampled_from([keys, signed]))
def test_fuzz_100000_random_and_mutated_tokens_never_raise(seed: int, k: BrowserKeys) -> None:
    rng = random.Random(seed)
    good = k.encode({"user": "ann", "n": seed}, storage_key="login", now=100, ttl=1000)
    for _ in range(1000):  # 100 examples x 1,000 tokens
        token = mutate(good, rng)
        decoded = k.decode(token, storage_key="login", now=101)
        if token == good:
            assert decoded.value == {"user": "ann", "n": seed}
        else:
            assert decoded.problem is not None or decoded.value == {"user": "ann", "n": seed}


class TestBrowserStateInEvents:
    def make(self) -> tuple[Any, Any]:
        from statekit import StateEngine
        from statekit.testing import FakeClock

        clock = FakeClock(1_000_000)
        engine = StateEngine(clock=clock)
        creds = engine.browser_state(
            "credentials", ["", ""], keys=keys, storage_key="login", ttl=3600, clock=clock
        )
        return engine, creds

    def test_missing_token_reads_default_and_a_write_returns_a_token(self) -> None:
        engine, creds = self.make()
        sid = engine.open_session()
        with engine.event(sid) as ev:
            assert ev[creds] == ["", ""]
            ev[creds] = ["ann", "hunter2"]
        assert ev.result.browser_problems == {"credentials": TokenProblem.MISSING}
        token = ev.result.browser["login"]
        assert "hunter2" not in token
        with engine.event(engine.open_session(), browser={"login": token}) as ev2:
            assert ev2[creds] == ["ann", "hunter2"]  # a refresh: a new session, same value
        assert ev2.result.browser == {}  # unchanged: nothing to send back

    @pytest.mark.parametrize("falsy", ["", 0, False, None, [], {}])
    def test_falsy_values_are_saved_like_any_other(self, falsy: Any) -> None:
        engine, _ = self.make()
        flag = engine.browser_state("flag", "default", keys=keys)
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[flag] = falsy
        token = ev.result.browser["flag"]
        with engine.event(sid, browser={"flag": token}) as ev:
            assert compare(ev[flag], falsy) is Change.SAME

    def test_listeners_see_in_place_changes(self) -> None:
        engine, creds = self.make()
        seen: list[Any] = []
        creds.on_change(lambda ev, value: seen.append(list(value)))
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[creds][0] = "bob"
        assert seen == [["bob", ""]]
        assert ev.result.changed == {"credentials"}

    def test_bad_tokens_read_as_default_with_a_reason_and_never_raise(self) -> None:
        engine, creds = self.make()
        sid = engine.open_session()
        for bad, problem in [
            ("nonsense", TokenProblem.MALFORMED),
            (
                BrowserKeys(["z" * 32]).encode(["x"], storage_key="login", now=1),
                TokenProblem.UNKNOWN_KEY,
            ),
        ]:
            with engine.event(sid, browser={"login": bad, 5: "ignored"}) as ev:
                assert ev[creds] == ["", ""]
            assert ev.result.browser_problems == {"credentials": problem}

    def test_expired_token_reads_as_default(self) -> None:
        engine, creds = self.make()
        sid = engine.open_session()
        with engine.event(sid) as ev:
            ev[creds] = ["ann", "pw"]
        token = ev.result.browser["login"]
        creds._clock.advance(3601)
        with engine.event(engine.open_session(), browser={"login": token}) as ev:
            assert ev[creds] == ["", ""]
        assert ev.result.browser_problems == {"credentials": TokenProblem.EXPIRED}

    def test_a_token_of_a_retired_key_is_reissued(self) -> None:
        from statekit import StateEngine

        old = StateEngine().browser_state("p", "dark", keys=BrowserKeys([OLD]))
        engine = StateEngine()
        prefs = engine.browser_state("p", "light", keys=BrowserKeys([SECRET, OLD]))
        token = old.encode("dark")
        sid = engine.open_session()
        with engine.event(sid, browser={"p": token}) as ev:
            assert ev[prefs] == "dark"
        fresh = ev.result.browser["p"]
        new_only = StateEngine().browser_state("p", "light", keys=BrowserKeys([SECRET]))
        assert new_only.decode(fresh).value == "dark"

    def test_non_json_values_and_bad_declarations_are_refused(self) -> None:
        from statekit import InvalidDeclaration, ValueNotStorable

        engine, creds = self.make()
        sid = engine.open_session()
        with pytest.raises(ValueNotStorable, match="'credentials'"), engine.event(sid) as ev:
            ev[creds] = [object()]
        with pytest.raises(ValueNotStorable):
            engine.browser_state("bad", object(), keys=keys)
        with pytest.raises(InvalidDeclaration, match="BrowserKeys"):
            engine.browser_state("nokeys", 1, keys="secret")
        with pytest.raises(InvalidDeclaration, match="storage key"):
            engine.browser_state("sk", 1, keys=keys, storage_key="has space")

    def test_oversized_value_fails_at_write_time_and_writes_nothing(self) -> None:
        from statekit import StateEngine

        engine = StateEngine()
        notes = engine.browser_state("notes", "", keys=keys, max_bytes=256)
        cart = engine.session_state("cart", 0)
        sid = engine.open_session()
        with pytest.raises(TokenTooLarge, match="'notes'"), engine.event(sid) as ev:
            ev[cart] = 1
            ev[notes] = os_random_text(2000)
        assert cart.get(sid) == 0


class TestBrowserStateIsolation:
    def test_a_token_of_one_state_or_app_is_never_read_as_another(self) -> None:
        from statekit import InvalidDeclaration, StateEngine

        shop = StateEngine(app="shop")
        admin = StateEngine(app="admin")
        nickname = shop.browser_state("nickname", "", keys=keys, storage_key="n")
        role = shop.browser_state("role", "user", keys=keys, storage_key="r")
        admin_role = admin.browser_state("role", "user", keys=keys, storage_key="r")
        token = nickname.encode("admin")
        assert role.decode(token).problem is TokenProblem.WRONG_STORAGE_KEY
        assert admin_role.decode(role.encode("superuser")).problem is (
            TokenProblem.WRONG_STORAGE_KEY
        )
        with pytest.raises(InvalidDeclaration, match="share the localStorage key"):
            shop.browser_state("other", "", keys=keys, storage_key="n")

    def test_non_ascii_tokens_are_malformed_not_a_crash(self) -> None:
        good = keys.encode(1, storage_key="k", now=1)
        kid = good.split(".")[1]
        for bad in (f"sk1.{kid}.\u00e9.AAAA", "sk1.\u00e9.\u00e9.\u00e9", "\ud800"):
            assert keys.decode(bad, storage_key="k", now=2).problem is TokenProblem.MALFORMED

    def test_async_listeners_are_refused(self) -> None:
        from statekit import InvalidDeclaration, StateEngine

        engine = StateEngine()
        state = engine.session_state("s", 0)

        async def listener(ev: Any, value: int) -> None:
            pass

        with pytest.raises(InvalidDeclaration, match="coroutine"):
            state.on_change(listener)
