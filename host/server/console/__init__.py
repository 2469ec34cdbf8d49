"""The operator console: ``torpor serve``'s own web pages at ``/`` (issue 16).

Server-rendered HTML (Jinja2 templates under ``templates/``, one stylesheet and one small
script under ``static/``, committed: nothing is built at install time) over the same host
the ``/v1`` API serves, with the same tenants and scopes: ``pages.py`` (the pages and their
forms), ``sessions.py`` (logins with an operator token, kept as an HTTP-only SameSite
session cookie; CSRF tokens), ``views.py`` (what a page shows, as plain data: an agent's
timeline, the charts' geometry).

The gateway leaves the console's paths (:func:`~host.server.console.pages.owns`: ``/`` and
``/console/...``) to it, since a browser sends a session cookie, not a bearer token; the
console checks that session, the token behind it, its scopes and its rate limit itself,
and writes its refusals to the same ``host.gateway`` audit chain.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from host.server.console.pages import Console, owns

__all__ = ["Console", "owns", "routes"]


def routes(state: Any) -> list[BaseRoute]:
    """The console's routes, for :func:`host.server.app.create_app` (``state``: its ServerState)."""
    console = Console(state)
    state.console = console
    return console.routes()
