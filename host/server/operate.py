"""``/v1/agents/{id}/resume|fork|resolve``: an operator's moves on one agent, within a tenant.

Each answers before anything runs: the move is checked (and, for a fork or a settlement,
recorded in one transaction, as ``torpor fork`` and ``torpor resolve`` do) and the agent
is answered as it is then; the scheduler drives it in the background, and a client waits
for it with ``GET /v1/agents/{id}/wait`` as after an approval.

* ``resume`` (``runs:write``): continue an unfinished agent from its latest checkpoint (a
  fork, which is not run until resumed; an agent whose drive stopped for a full store).
  What the runtime would refuse is refused here, with its code, before it is scheduled:
  a finished agent or one parked on a person (``invalid_state``), one asleep before its
  time (``not_due``), one this server or another live process drives (``invalid_state``).
* ``fork`` (``runs:write``): a new agent of the same tenant from an earlier checkpoint
  (``checkpoint_not_found`` if it has none such); it waits ``suspended`` for a resume.
* ``resolve`` (``approvals:write``: only a person can know whether a call cut short took
  effect): settle an ``in_doubt`` agent with exactly one of ``retry``, ``result`` or
  ``fail``; it then resumes, or ends ``failed``.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.errors import AgentStateError, InvalidInput, ShuttingDown
from host.runtime import Host
from host.server.gateway import require
from host.server.inputs import json_object, optional_string, owned_agent
from host.server.responses import json_response


class Operate:
    def __init__(self, host: Host, scheduler: Any) -> None:
        self.host = host
        self.scheduler = scheduler

    async def resume(self, request: Request) -> Response:
        """Resume an unfinished agent from its latest checkpoint; it runs in the background."""
        who = require(request, "runs:write")
        aid = request.path_params["agent_id"]
        rec = owned_agent(self.host, aid, who)
        if self.scheduler.driving(aid):
            raise AgentStateError(f"agent {aid} is running on this server already")
        self.host.check_resumable(rec)
        if not self.scheduler.resume(aid):
            raise ShuttingDown(f"agent {aid} was not resumed: the server is shutting down")
        return json_response(owned_agent(self.host, aid, who), 202)

    async def fork(self, request: Request) -> Response:
        """A new agent from an earlier checkpoint (body ``{"checkpoint"}``), suspended until resumed."""
        who = require(request, "runs:write")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        body = await json_object(request)
        checkpoint = body.get("checkpoint")
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
            raise InvalidInput("'checkpoint' must be a checkpoint number (see the agent's inspect)")
        new_id = await anyio.to_thread.run_sync(lambda: self.host.fork(aid, checkpoint))
        return json_response({"agent_id": new_id, "parent": aid, "checkpoint": checkpoint}, 201)

    async def resolve(self, request: Request) -> Response:
        """Settle an in_doubt agent (body: one of ``{"retry": true}``, ``{"result": ...}``,
        ``{"fail": "reason"}``); it resumes in the background, or ends failed."""
        who = require(request, "approvals:write")
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, who)
        body = await json_object(request)
        retry = body.get("retry", False)
        if not isinstance(retry, bool):
            raise InvalidInput("'retry' must be true or false")
        fail = optional_string(body, "fail")
        has_result = "result" in body
        if sum((retry, has_result, fail is not None)) != 1:
            raise InvalidInput("resolve needs exactly one of: 'retry': true, a 'result' (the call's result, "
                               "JSON), or 'fail' (a reason)")
        if fail is not None and not fail.strip():
            raise InvalidInput("'fail' needs a reason (it is kept in the audit log and the agent's error)")
        result = body.get("result")
        if has_result and result is None:
            raise InvalidInput("'result' must be the call's result (JSON other than null)")
        await anyio.to_thread.run_sync(lambda: self.host.decide_resolve(
            aid, retry=retry, result=result, fail=fail, by=f"token:{who.token_id}"))
        # The lines of the drive that parked it in doubt are not this settlement's.
        self.scheduler.logs.drop(aid)
        if fail is None:
            self.scheduler.resume(aid)
        return json_response(owned_agent(self.host, aid, who))


def routes(op: Operate) -> list[Route]:
    return [
        Route("/v1/agents/{agent_id}/resume", op.resume, methods=["POST"], name="resume_agent"),
        Route("/v1/agents/{agent_id}/fork", op.fork, methods=["POST"], name="fork_agent"),
        Route("/v1/agents/{agent_id}/resolve", op.resolve, methods=["POST"], name="resolve_agent"),
    ]
