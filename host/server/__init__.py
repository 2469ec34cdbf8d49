"""``torpor serve``: the long-running host behind an authenticated HTTP gateway.

An ASGI application (Starlette, served by uvicorn) around one :class:`~host.runtime.Host`:
:mod:`.gateway` lets in only requests with an operator token (scopes, tenants, rate
limits, body caps; every refusal audited), the route modules turn ``/v1`` requests into
the runtime's own calls and answer with the very dicts its queries return, and
:mod:`.scheduler` drives the agents in the background: runs started over HTTP, agents a
person decided, agents a previous process left, and waits that end at a time.

Imported only by ``host/cli`` (lazily, when ``serve`` runs) and ``bench``.
"""
