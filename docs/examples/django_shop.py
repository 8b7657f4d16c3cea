"""The shop (``shop.py``) on Django, through ``statekit.integrations.django``: a whole
Django project in one file (settings, views, urls, the WSGI ``application``).

Run it (``pip install 'statekit[django,browser]'``)::

    python docs/examples/django_shop.py --port 8000

or with several workers on Redis (each worker makes its own engine at import; with
``--preload`` the master makes it and the workers inherit it: both work)::

    export STATEKIT_REDIS_URL=redis://127.0.0.1:6379/0
    export STATEKIT_SECRETS=...   # one secret for every worker, 32+ characters
    gunicorn -w 2 --chdir docs/examples django_shop:application

Each tab of a browser has its own cart (statekit.js opens a session per tab), the visit
counter is shared by everyone, and the username signed in is kept in the browser, for
every tab of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.wsgi import get_wsgi_application
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.urls import path
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_GET, require_POST
from shop import PAGE, Shop

from statekit.integrations.django import visit_of

shop = Shop()
settings.configure(
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["localhost", "127.0.0.1"],
    MIDDLEWARE=[
        "django.middleware.security.SecurityMiddleware",
        "django.middleware.common.CommonMiddleware",
        "django.middleware.csrf.CsrfViewMiddleware",  # on, as in a new project
        "django.middleware.clickjacking.XFrameOptionsMiddleware",
        f"{__name__}.BadValue",
        "statekit.integrations.django.StateKitMiddleware",  # last: it answers errors first
    ],
    STATEKIT_ENGINE=shop.engine,
)
#: The shop's page, sending Django's CSRF token (from its cookie) with each kit.fetch.
DJANGO_PAGE = PAGE.replace(
    "StateKit.start({",
    "StateKit.start({ headers: () => "
    '({ "X-CSRFToken": (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] }),',
)


class BadValue:
    """A ValueError raised by a view is a bad request: ``400 {"detail": ...}``. (With
    ``STATEKIT_EXAMPLE_PID_HEADER=1``, each answer also names its worker, for tests.)"""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if os.environ.get("STATEKIT_EXAMPLE_PID_HEADER") == "1":  # for multi-worker tests
            response["X-Worker"] = str(os.getpid())
        return response

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if isinstance(exc, ValueError):
            return JsonResponse({"detail": str(exc)}, status=400)
        return None


def field(request: HttpRequest, name: str) -> object:
    """A field of the request's JSON object (None if absent or not an object; a body
    that is not JSON raises ValueError)."""
    body = json.loads(request.body or b"{}")
    return body.get(name) if isinstance(body, dict) else None


@require_GET
@ensure_csrf_cookie  # the page's script reads the token from this cookie
def page(request: HttpRequest) -> HttpResponse:
    return HttpResponse(DJANGO_PAGE)


@require_POST
def count_visit(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:  # raises first when the tab's session has ended
        visits = shop.visits.increment()
        return JsonResponse({**shop.show(ev), "visits": visits})


@require_POST
def add_to_cart(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:
        return JsonResponse(shop.add(ev, field(request, "item")))


@require_POST
def login(request: HttpRequest) -> JsonResponse:
    with visit_of(request).event() as ev:
        return JsonResponse(shop.login(ev, field(request, "username")))


urlpatterns: list[Any] = [
    path("", page),
    path("api/visit", count_visit),
    path("api/cart", add_to_cart),
    path("api/login", login),
]
application = get_wsgi_application()


if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    port = parser.parse_args().port
    execute_from_command_line([sys.argv[0], "runserver", f"127.0.0.1:{port}", "--noreload"])
