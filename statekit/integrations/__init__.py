"""Thin adapters of :mod:`statekit.web` to web frameworks, each an optional extra.

- :mod:`statekit.integrations.asgi`: Starlette, FastAPI and any ASGI app.
- :mod:`statekit.integrations.fastapi`: the FastAPI dependency.
- :mod:`statekit.integrations.flask`: the Flask extension.
- :mod:`statekit.integrations.django`: the Django middleware.
- :mod:`statekit.integrations.prometheus`: the engines' figures as Prometheus metrics.

Nothing here is imported by ``statekit`` itself; each module imports only its framework
(or, for metrics, ``prometheus_client``).
"""
