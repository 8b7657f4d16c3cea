"""What crosses the wire between a page and the server: header, field, cookie and
endpoint names, reading a request's session and tokens, and the answers a page acts on.
Plain data and functions over strings and mappings; no framework is imported, and
reading a request never raises on bad input (a malformed header reads as absent).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from statekit.exceptions import (
    SessionBusy,
    SessionExpired,
    SessionNotFound,
    SessionNotInitialized,
    StoreUnavailable,
)

__all__ = [
    "BROWSER_HEADER",
    "BROWSER_SET_HEADER",
    "CLOSE_PATH",
    "ENDED_HEADER",
    "OPEN_PATH",
    "PREFIX",
    "SCRIPT_PATH",
    "SESSION_COOKIE",
    "SESSION_FIELD",
    "SESSION_HEADER",
    "SESSION_QUERY",
    "VISIT_HEADERS",
    "WATCH_PATH",
    "Answer",
    "Incoming",
    "LowerHeaders",
    "answer_for",
    "browser_set_value",
    "browser_tokens",
    "is_cross_site",
    "is_page_load",
    "json_answer",
    "opened",
    "read_request",
    "script",
    "script_answer",
    "visit_headers",
]

#: Where an integration serves the page's endpoints, by default.
PREFIX = "/statekit"
#: ``POST <prefix>/open``: open a session for a tab; answered ``{"sid": ...}``.
OPEN_PATH = "/open"
#: ``POST <prefix>/close`` with the session id as the body: the tab was closed.
CLOSE_PATH = "/close"
#: ``GET <prefix>/statekit.js``: the page's helper.
SCRIPT_PATH = "/statekit.js"
#: ``GET <prefix>/watch?statekit_session=<sid>``: the tab's change stream, as
#: Server-Sent Events (ASGI hosts; see ``statekit.web.stream``).
WATCH_PATH = "/watch"

SESSION_HEADER = "X-Statekit-Session"
SESSION_FIELD = "statekit_session"
SESSION_COOKIE = "statekit_session"
#: The query parameter that names the session on a websocket handshake (a browser
#: cannot set headers on one); read on websocket requests only.
SESSION_QUERY = "statekit_session"
BROWSER_HEADER = "X-Statekit-Browser"
BROWSER_SET_HEADER = "X-Statekit-Browser-Set"
ENDED_HEADER = "X-Statekit-Session-Ended"

# The headers' names as ASGI servers and LowerHeaders give them.
_SESSION_KEY = SESSION_HEADER.lower()
_BROWSER_KEY = BROWSER_HEADER.lower()

#: Every header a visit reads (:func:`read_request`, :func:`is_page_load`,
#: :func:`is_cross_site`, and the cookie), lower case: an integration that decodes a
#: request's headers itself need decode only these.
VISIT_HEADERS = frozenset(
    {_SESSION_KEY, _BROWSER_KEY, "accept", "cookie", "host", "origin", "sec-fetch-site"}
)

#: The largest header value read for browser tokens (a page's tokens are small).
_MAX_TOKENS_BYTES = 256 * 1024


@attrs.frozen(kw_only=True)
class Incoming:
    """What a request carries for statekit.

    Attributes:
        sid: the session id it names, or None.
        source: where the id came from: ``"header"`` (statekit.js), ``"field"`` (a
            form), ``"query"`` (a websocket handshake), ``"cookie"`` (the
            no-JavaScript fallback), or None.
        tokens: the page's browser-state tokens, by storage key.
    """

    sid: str | None
    source: Literal["header", "field", "query", "cookie"] | None
    tokens: Mapping[str, str] = attrs.field(factory=dict)


class LowerHeaders(dict[str, str]):
    """Headers whose names are lower case already (an ASGI server's are): read as they
    are, where other mappings are lowered first (once per reader, on every request)."""

    __slots__ = ()


def _lower(mapping: Mapping[str, str]) -> Mapping[str, str]:
    if mapping.__class__ is LowerHeaders:
        return mapping
    return {str(k).lower(): v for k, v in mapping.items()}


def visit_headers(headers: Mapping[str, str], *, any_case: bool = False) -> LowerHeaders:
    """The headers a visit reads (:data:`VISIT_HEADERS`) of a request's, lower case, in
    one pass (the readers then use them as they are): what an integration hands
    :meth:`SessionGate.visit <statekit.web.SessionGate.visit>`, which makes them itself
    from any other mapping.

    Args:
        headers: the request's headers.
        any_case: the mapping finds a name in any case (Django's ``request.headers``,
            Werkzeug's): the seven are looked up rather than every header read.
    """
    if headers.__class__ is LowerHeaders:
        return headers
    out = LowerHeaders()
    if any_case:
        for name in VISIT_HEADERS:
            value = headers.get(name)
            if value is not None:
                out[name] = value
        return out
    for key, value in headers.items():
        name = str(key).lower()
        if name in VISIT_HEADERS:
            out[name] = value
    return out


def read_request(
    headers: Mapping[str, str],
    *,
    cookies: Mapping[str, str] | None = None,
    form: Mapping[str, Any] | None = None,
    query: Mapping[str, Any] | None = None,
) -> Incoming:
    """What a request carries: its session id (the header first, then a form field or
    a websocket's query parameter, then the cookie) and its browser tokens. Never
    raises: a value that is not a string, or a malformed tokens header, reads as absent.

    Args:
        headers: the request's headers (any case).
        cookies: its cookies, if the host reads them.
        form: its form fields, if the host has parsed them (statekit never reads a
            request's body itself).
        query: a websocket handshake's query parameters (pass them for websockets
            only: in any other request the id belongs in the header).
    """
    lowered = _lower(headers)
    tokens = browser_tokens(lowered.get(_BROWSER_KEY))
    if sid := _id_in(lowered, _SESSION_KEY):
        return Incoming(sid=sid, source="header", tokens=tokens)
    if sid := _id_in(form, SESSION_FIELD):
        return Incoming(sid=sid, source="field", tokens=tokens)
    if sid := _id_in(query, SESSION_QUERY):
        return Incoming(sid=sid, source="query", tokens=tokens)
    if sid := _id_in(cookies, SESSION_COOKIE):
        return Incoming(sid=sid, source="cookie", tokens=tokens)
    return Incoming(sid=None, source=None, tokens=tokens)


def _id_in(source: object, key: str) -> str | None:
    """The session id under ``key`` in a mapping: a non-empty string, else None (so is
    anything in what is not a mapping)."""
    if not isinstance(source, Mapping):
        return None
    value = source.get(key)
    return value if isinstance(value, str) and value else None


def browser_tokens(value: str | bytes | None) -> dict[str, str]:
    """The tokens in an ``X-Statekit-Browser`` header: a JSON object of storage key to
    token. Anything else (absent, too long, not JSON, not an object) reads as none, and
    entries whose key or token is not a string are left out."""
    if value is None:
        return {}
    if isinstance(value, bytes):
        try:
            value = value.decode("latin-1")
        except ValueError:  # pragma: no cover - latin-1 decodes every byte
            return {}
    if not isinstance(value, str) or len(value) > _MAX_TOKENS_BYTES:
        return {}
    try:
        raw = json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested too deep, say '[[[['
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


def browser_set_value(tokens: Mapping[str, str | None]) -> str | None:
    """The ``X-Statekit-Browser-Set`` header value for new tokens (``None`` removes a
    key), or None when there are none to send."""
    if not tokens:
        return None
    return json.dumps(dict(tokens), separators=(",", ":"))


def is_page_load(method: str, headers: Mapping[str, str]) -> bool:
    """Whether a request is a browser loading a page (a ``GET`` that accepts HTML and
    was not sent by statekit.js): where the cookie fallback opens a session."""
    lowered = _lower(headers)
    return (
        method.upper() == "GET"
        and "text/html" in str(lowered.get("accept", ""))
        and _SESSION_KEY not in lowered
    )


def is_cross_site(headers: Mapping[str, str], *, allowed_origins: Iterable[str] = ()) -> bool:
    """Whether a browser sent a request from another site's page (a cross-site form or
    ``fetch``): by ``Sec-Fetch-Site``, which every current browser sends, else by
    ``Origin`` against ``Host``. A request with neither (a non-browser client) is not.

    Args:
        headers: the request's headers (any case).
        allowed_origins: origins (``"https://app.example.com"``) whose pages may call,
            for a front end served from another origin.
    """
    lowered = _lower(headers)
    origin = lowered.get("origin")
    origin = origin.strip().lower() if isinstance(origin, str) else ""
    if origin and origin in {o.rstrip("/").lower() for o in allowed_origins}:
        return False
    site = lowered.get("sec-fetch-site")
    if isinstance(site, str) and site.strip():
        return site.strip().lower() not in ("same-origin", "none")
    if not origin:
        return False
    if origin == "null":  # a sandboxed frame, a privacy-redirected request
        return True
    host = lowered.get("host")
    return not isinstance(host, str) or urlsplit(origin).netloc != host.strip().lower()


@attrs.frozen(kw_only=True)
class Answer:
    """A response an integration sends for statekit: status, headers, JSON body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def json_answer(status: int, body: Mapping[str, Any], **headers: str) -> Answer:
    """An answer with a JSON body (and ``Content-Type: application/json``)."""
    return Answer(
        status=status,
        headers={"Content-Type": "application/json", **headers},
        body=json.dumps(dict(body), separators=(",", ":")).encode(),
    )


def opened(sid: str) -> Answer:
    """The answer to ``POST <prefix>/open``."""
    return json_answer(200, {"sid": sid}, **{"Cache-Control": "no-store"})


def answer_for(exc: BaseException) -> Answer | None:
    """The answer the page can act on for an error statekit raised in a request, or
    None for an error that is the host's to handle (a bug, a bad value).

    - :class:`~statekit.SessionNotFound` (ended, unknown, damaged): ``409``, with
      ``X-Statekit-Session-Ended`` naming the reason (``unknown`` when the id was never
      known, ``missing`` when the request named none): open a new session, or reload.
    - :class:`~statekit.SessionNotInitialized` for a session that was closed (its
      per-session objects were cleaned up): ``409``, reason ``closed``. One for a
      session whose object was never made is the host's to handle.
    - :class:`~statekit.SessionBusy`: ``503``, ``Retry-After: 1``.
    - :class:`~statekit.StoreUnavailable`: ``503``, ``Retry-After: 1``.

    Messages go in the body; they never hold a whole session id.
    """
    if isinstance(exc, SessionNotFound):
        if isinstance(exc, SessionExpired):
            reason = exc.reason
        else:
            reason = "unknown" if exc.sid else "missing"
        return json_answer(
            409,
            {"error": "session_ended", "reason": reason, "detail": str(exc)},
            **{ENDED_HEADER: reason},
        )
    if isinstance(exc, SessionNotInitialized) and exc.closed:
        # The tab's per-session object went with its session: the page was closed.
        return json_answer(
            409,
            {"error": "session_ended", "reason": "closed", "detail": str(exc)},
            **{ENDED_HEADER: "closed"},
        )
    if isinstance(exc, SessionBusy):
        return json_answer(503, {"error": "busy", "detail": str(exc)}, **{"Retry-After": "1"})
    if isinstance(exc, StoreUnavailable):
        return json_answer(
            503, {"error": "unavailable", "detail": str(exc)}, **{"Retry-After": "1"}
        )
    return None


def script() -> bytes:
    """The text of ``statekit.js``, the page's helper, to serve at
    ``<prefix>/statekit.js``."""
    return resources.files("statekit.static").joinpath("statekit.js").read_bytes()


def script_answer(headers: Mapping[str, str]) -> Answer:
    """The answer to ``GET <prefix>/statekit.js``: the script, or ``304`` to a browser
    whose ``If-None-Match`` names its ETag."""
    body, etag = _script_and_tag()
    sent = _lower(headers).get("if-none-match")
    common = {"ETag": etag, "Cache-Control": "no-cache"}
    if isinstance(sent, str) and etag in {t.strip() for t in sent.split(",")}:
        return Answer(status=304, headers=common, body=b"")
    return Answer(
        status=200,
        headers={"Content-Type": "text/javascript; charset=utf-8", **common},
        body=body,
    )


@functools.cache
def _script_and_tag() -> tuple[bytes, str]:
    """The script, read once per process, and its ETag."""
    body = script()
    return body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
