"""Browser state tokens: values kept in the browser, opaque to it.

A token is what the browser stores (in ``localStorage``) and sends back; only the server
can read or make one. Format, all URL-safe::

    sk1.<kid>.<where>.<body>      encrypted (AES-256-GCM), the default
    sk1s.<kid>.<where>.<body>     signed only (HMAC-SHA256): the browser can read it

- ``kid`` names the secret that made it (a digest, never the secret), so that a list of
  secrets, newest first, can rotate keys: a token under an older secret still decodes
  and says that re-encoding is due.
- ``where`` is a short MAC of the storage key (and of the host's optional binding, such
  as a user id): a token copied under another storage key, or to another user, is told
  apart from a tampered one without revealing either.
- ``body`` is the payload (tagged JSON of the value, issue time, optional expiry);
  encrypted, the storage key and binding are its associated data, and the payload is
  padded with spaces to a multiple of 32 bytes and not compressed (unless asked), so
  that a token's length says little about the value. Signed tokens are
  zlib-compressed when that makes them smaller.

Only the exact text that was issued decodes: base64 is read strictly (see
:func:`_unb64`), so a token has one spelling.

Decoding never raises and never unpickles: any failure gives the state's default and a
:class:`TokenProblem` the host can log. Encoding checks a size budget and raises
:class:`TokenTooLarge` naming the state and the size.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import warnings
import zlib
from collections.abc import Sequence
from typing import Any

import attrs

from ._codec import JSONCodec
from .exceptions import CodecError, TokenTooLarge

__all__ = ["BrowserKeys", "DecodedToken", "TokenProblem"]

_CODEC = JSONCodec()
_NONCE = 12
_PAD = 32  # encrypted bodies are a multiple of this many bytes
_KDF_INFO = b"statekit browser state v1"
# Budgets: localStorage gives an origin about 5 MB; a token should be a small share.
DEFAULT_MAX_BYTES = 16 * 1024


class TokenProblem(str, enum.Enum):
    """Why a token did not decode; the state then reads as its default."""

    MISSING = "missing"
    """No token was sent."""
    MALFORMED = "malformed"
    """Not a statekit token, or truncated."""
    UNKNOWN_KEY = "unknown_key"
    """Made with a secret this server does not have (rotated out, or another app)."""
    WRONG_STORAGE_KEY = "wrong_storage_key"
    """Made for another storage key, or bound to another user."""
    TAMPERED = "tampered"
    """Its content was changed: the signature or authentication tag does not match."""
    EXPIRED = "expired"
    """Its expiry has passed."""
    OVERSIZED = "oversized"
    """Larger than the state's size budget."""
    NOT_JSON = "not_json"
    """Authentic, but its payload does not decode to a value."""

    def __str__(self) -> str:
        return self.value


@attrs.frozen(kw_only=True)
class DecodedToken:
    """The outcome of decoding a token.

    Attributes:
        value: the value, or ``None`` when ``problem`` is set (the caller uses its default).
        problem: why the token was refused, or ``None``.
        reencode: the token is valid but was made with an older secret: send a new one.
        issued_at: when the token was made (wall clock), when known.
    """

    value: Any = None
    problem: TokenProblem | None = None
    reencode: bool = False
    issued_at: float | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    """The bytes whose :func:`_b64` is exactly ``text``.

    Base64 decoders also accept other spellings of the same bytes (unused low bits set
    in the last character, characters outside the alphabet skipped, ``=`` padding, the
    ``+/`` alphabet); accepting them would make many strings one token.

    Raises:
        ValueError: ``text`` is not the canonical unpadded URL-safe base64 of any bytes.
    """
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:  # binascii.Error, for a length no bytes encode to
        data = None
    if data is None or _b64(data) != text:
        raise ValueError("not the canonical unpadded URL-safe base64 of any bytes")
    return data


def _bytes(text: str) -> bytes:
    """Text of the host's (a binding such as a user id) as bytes for a MAC. Any str
    has an encoding, lone surrogates included, so decoding a token never raises
    because of the binding; distinct texts give distinct bytes."""
    return text.encode("utf-8", "surrogatepass")


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) with a fixed salt: independent keys from one secret."""
    prk = hmac.new(b"statekit", secret, hashlib.sha256).digest()
    out, block = b"", b""
    counter = 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


class _Key:
    __slots__ = ("aead", "kid", "mac_key")

    def __init__(self, secret: bytes, encrypted: bool) -> None:
        material = _hkdf(secret, _KDF_INFO, 64)
        enc_key, self.mac_key = material[:32], material[32:]
        self.kid = _b64(hashlib.sha256(b"kid" + material).digest()[:6])
        self.aead: Any = None
        if encrypted:
            self.aead = _aesgcm(enc_key)


def _aesgcm(key: bytes) -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as exc:
        raise ImportError(
            "encrypted browser state needs the cryptography package: "
            "pip install 'statekit[browser]' (or choose BrowserKeys(..., encrypt=False) "
            "for signed, readable tokens)"
        ) from exc
    return AESGCM(key)


class BrowserKeys:
    """The secrets that make and read browser tokens. Thread-safe, immutable.

    Args:
        secrets: one or more secrets of at least 32 bytes (bytes or str), newest first.
            Tokens are made with the first; all are accepted when reading. Keep them out
            of the page: only the tokens ever reach the browser.
        encrypt: ``True`` (the default) encrypts tokens with AES-256-GCM (needs the
            ``browser`` extra). ``False`` only signs them (HMAC-SHA256, standard library):
            the browser can then read the value, but not change it.
        compress: whether to zlib-compress a token's payload when that makes it
            smaller. ``None`` (the default) compresses signed tokens, which the browser
            can read anyway, and not encrypted ones. ``True`` on encrypted tokens makes
            their length depend on how well the value compresses, and that leaks its
            content: when a value holds a secret and text an attacker can influence
            (``{"api_token": ..., "note": ...}``), the attacker learns the secret a
            character at a time from which guess gives the shortest token (the CRIME
            and BREACH attacks; the 32-byte padding does not stop them, the attacker
            lengthens his text until the token sits at a step). Never put secrets and
            attacker-influenced text in one compressed value.

    Raises:
        ValueError: no secret, or one shorter than 32 bytes.
    """

    def __init__(
        self,
        secrets: Sequence[bytes | str] | bytes | str,
        *,
        encrypt: bool = True,
        compress: bool | None = None,
    ) -> None:
        if isinstance(secrets, (bytes, str)):
            secrets = [secrets]
        raw = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in secrets]
        if not raw or any(len(s) < 32 for s in raw):
            raise ValueError(
                "BrowserKeys needs one or more secrets of at least 32 bytes, newest first; "
                "generate one with: python -c 'import secrets; print(secrets.token_hex(32))'"
            )
        self.encrypt = encrypt
        self.compress = not encrypt if compress is None else compress
        self._keys = [_Key(s, encrypt) for s in raw]
        self._by_kid = {key.kid: (i, key) for i, key in enumerate(self._keys)}
        self.prefix = "sk1" if encrypt else "sk1s"

    def __repr__(self) -> str:
        mode = "encrypted" if self.encrypt else "signed"
        return f"BrowserKeys(<{len(self._keys)} secret(s)>, {mode})"

    @classmethod
    def ephemeral(
        cls, *, encrypt: bool = True, compress: bool | None = None, warn: bool = True
    ) -> BrowserKeys:
        """Keys from a random secret made now, for development only.

        Args:
            warn: whether to warn (``RuntimeWarning``) that tokens made with these keys
                cannot be read after this process ends, so that every browser value is
                lost on restart. A demo or a test that chose this passes ``False`` (and
                may say it as information).

        Give real secrets in production.
        """
        if warn:
            warnings.warn(
                "BrowserKeys.ephemeral(): browser values will not survive a restart of "
                "this process; pass BrowserKeys([secret]) with a secret kept in your "
                "configuration",
                RuntimeWarning,
                stacklevel=2,
            )
        return cls([os.urandom(32)], encrypt=encrypt, compress=compress)

    def _where(self, key: _Key, storage_key: str, bind: str) -> str:
        tag = hmac.new(key.mac_key, _bytes(f"{storage_key}\0{bind}"), hashlib.sha256)
        return _b64(tag.digest()[:6])

    # ``storage_key`` as given to encode/decode is the caller's full context: the
    # engine passes "<app>/<state>/<localStorage key>", so that a token of one state
    # or app is never read as another's, even under shared secrets.

    def encode(
        self,
        value: Any,
        *,
        storage_key: str,
        now: float,
        ttl: float | None = None,
        bind: str = "",
        state: str = "",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> str:
        """Make the token for ``value``.

        Raises:
            CodecError: the value is not JSON-typed (see :class:`~statekit.JSONCodec`).
            TokenTooLarge: the token exceeds ``max_bytes``.
        """
        expires = None if ttl is None else now + ttl
        payload = _CODEC.encode({"v": value, "iat": now, "exp": expires})
        body = b"j" + payload
        if self.compress:
            packed = zlib.compress(payload, 6)
            if len(packed) < len(payload):
                body = b"z" + packed
        key = self._keys[0]
        where = self._where(key, storage_key, bind)
        aad = _bytes(f"{self.prefix}.{key.kid}.{where}.{storage_key}\0{bind}")
        if key.aead is not None:
            # JSON ignores trailing spaces and zlib leaves bytes after its stream unread,
            # so padding needs no length field; the tag authenticates it with the rest.
            body += b" " * (-len(body) % _PAD)
            nonce = os.urandom(_NONCE)
            sealed = nonce + key.aead.encrypt(nonce, body, aad)
        else:
            sealed = body + hmac.new(key.mac_key, aad + body, hashlib.sha256).digest()
        token = f"{self.prefix}.{key.kid}.{where}.{_b64(sealed)}"
        if len(token) > max_bytes:
            raise TokenTooLarge(state or storage_key, len(token), max_bytes)
        return token

    def decode(
        self,
        token: object,
        *,
        storage_key: str,
        now: float,
        bind: str = "",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> DecodedToken:
        """Read a token. Never raises: failures come back as a :class:`TokenProblem`."""
        if token is None or token == "":
            return DecodedToken(problem=TokenProblem.MISSING)
        if not isinstance(token, str):
            return DecodedToken(problem=TokenProblem.MALFORMED)
        if len(token) > max_bytes:
            return DecodedToken(problem=TokenProblem.OVERSIZED)
        if not token.isascii():  # tokens are URL-safe ASCII; compare_digest needs it
            return DecodedToken(problem=TokenProblem.MALFORMED)
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != self.prefix:
            return DecodedToken(problem=TokenProblem.MALFORMED)
        prefix, kid, where, body_text = parts
        found = self._by_kid.get(kid)
        if found is None:
            return DecodedToken(problem=TokenProblem.UNKNOWN_KEY)
        index, key = found
        if not hmac.compare_digest(where, self._where(key, storage_key, bind)):
            return DecodedToken(problem=TokenProblem.WRONG_STORAGE_KEY)
        try:
            sealed = _unb64(body_text)
        except ValueError:
            return DecodedToken(problem=TokenProblem.MALFORMED)
        aad = _bytes(f"{prefix}.{kid}.{where}.{storage_key}\0{bind}")
        if key.aead is not None:
            if len(sealed) < _NONCE + 16:
                return DecodedToken(problem=TokenProblem.MALFORMED)
            try:
                body = key.aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
            except Exception:
                return DecodedToken(problem=TokenProblem.TAMPERED)
        else:
            if len(sealed) < 33:
                return DecodedToken(problem=TokenProblem.MALFORMED)
            body, mac = sealed[:-32], sealed[-32:]
            expected = hmac.new(key.mac_key, aad + body, hashlib.sha256).digest()
            if not hmac.compare_digest(mac, expected):
                return DecodedToken(problem=TokenProblem.TAMPERED)
        return self._open(body, now=now, reencode=index > 0)

    @staticmethod
    def _open(body: bytes, *, now: float, reencode: bool) -> DecodedToken:
        try:
            if body[:1] == b"z":
                # Bounded: an authentic token was made by us under the size budget. The
                # padding of an encrypted body, after the stream, is left unread.
                payload = zlib.decompressobj().decompress(body[1:], 1 << 20)
            elif body[:1] == b"j":
                payload = body[1:]
            else:
                return DecodedToken(problem=TokenProblem.NOT_JSON)
            data = _CODEC.decode(payload)
            value, issued, expires = data["v"], data["iat"], data["exp"]
        except (zlib.error, CodecError, KeyError, TypeError, ValueError):
            return DecodedToken(problem=TokenProblem.NOT_JSON)
        if expires is not None and now >= expires:
            return DecodedToken(problem=TokenProblem.EXPIRED, issued_at=issued)
        return DecodedToken(value=value, reencode=reencode, issued_at=issued)
