"""A host-side tool that needs a credential: it checks an order against an "ERP" with a token.

The token arrives in ``ctx.secrets`` (leased by the host's broker for this call);
the answer the guest gets says only whether the check passed. ``SEEN`` keeps a
digest of every token the tool was handed, for the tests.
"""

import hashlib

import anyio
from pydantic import BaseModel

SEEN: list[str] = []


class CheckArgs(BaseModel):
    order: int
    ms: int = 0


async def check(args: CheckArgs, ctx: object) -> dict[str, object]:
    await anyio.sleep(args.ms / 1000)  # a slow ERP: the lease may run out meanwhile
    token = ctx.secrets["erp_token"]  # type: ignore[attr-defined]
    SEEN.append(hashlib.sha256(token.encode()).hexdigest())
    return {"ok": bool(token), "order": args.order}
