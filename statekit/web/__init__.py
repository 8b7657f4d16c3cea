"""What crosses the wire between a page and the server, for any web framework.

statekit's integrations (ASGI, Flask, Django) and any adapter a host writes itself
share this one description of the wire, so that ``statekit.js`` talks to all of them
alike:

- **A session per tab.** On load, the page asks for a session (``POST
  <prefix>/open``, answered ``{"sid": "..."}``) and keeps its id in page memory, not
  in storage: a refresh or a duplicated tab is a new session. It sends the id with every
  request it makes, in the ``X-Statekit-Session`` header (``fetch``, htmx) or the
  ``statekit_session`` form field (plain forms), and on ``pagehide`` it sends its own id
  to ``<prefix>/close`` with ``navigator.sendBeacon``.
- **A cookie only as a fallback**, for pages without JavaScript: one session per
  *browser* (every tab shares it), opened on a page load that carries no session.
- **Browser state** travels in ``X-Statekit-Browser`` (the page's tokens, a JSON object
  of storage key to token) and comes back in ``X-Statekit-Browser-Set`` (new tokens;
  ``null`` removes a key).
- **Errors the page can act on**: an ended or unknown session is answered ``409`` with
  ``X-Statekit-Session-Ended: <reason>`` and a JSON body; the page can open a new
  session or reload. A busy session or an unavailable store is ``503`` with
  ``Retry-After``.

Everything here is plain data and functions over strings and mappings: no framework is
imported. Reading a request never raises on bad input (a malformed header reads as
absent).

An integration is a :class:`SessionGate` (one per app, over the app's engine) and, per
request, a :class:`Visit`: the gate answers statekit's own endpoints
(:meth:`SessionGate.serve`), the visit gives the handler its session and events with the
page's browser tokens in and out, and says what to add to the response. A host with no
integration of its own (aiohttp, Litestar, a websocket server) writes one from these
two classes in a few lines.
"""

from __future__ import annotations

from statekit.web.at_exit import shut_down_at_exit
from statekit.web.gate import FormSource, SessionGate, Visit, VisitEvent
from statekit.web.stream import STREAM_HEADERS, change_event, server_sent_events
from statekit.web.wire import (
    BROWSER_HEADER,
    BROWSER_SET_HEADER,
    CLOSE_PATH,
    ENDED_HEADER,
    OPEN_PATH,
    PREFIX,
    SCRIPT_PATH,
    SESSION_COOKIE,
    SESSION_FIELD,
    SESSION_HEADER,
    SESSION_QUERY,
    VISIT_HEADERS,
    WATCH_PATH,
    Answer,
    Incoming,
    LowerHeaders,
    answer_for,
    browser_set_value,
    browser_tokens,
    is_cross_site,
    is_page_load,
    json_answer,
    opened,
    read_request,
    script,
    script_answer,
    visit_headers,
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
    "STREAM_HEADERS",
    "VISIT_HEADERS",
    "WATCH_PATH",
    "Answer",
    "FormSource",
    "Incoming",
    "LowerHeaders",
    "SessionGate",
    "Visit",
    "VisitEvent",
    "answer_for",
    "browser_set_value",
    "browser_tokens",
    "change_event",
    "is_cross_site",
    "is_page_load",
    "json_answer",
    "opened",
    "read_request",
    "script",
    "script_answer",
    "server_sent_events",
    "shut_down_at_exit",
    "visit_headers",
]
