"""A host-side tool that takes its time, to exercise hibernation while waiting."""

import anyio
from pydantic import BaseModel


class EchoArgs(BaseModel):
    value: int
    ms: int = 0


async def echo(args: EchoArgs, ctx: object) -> dict[str, int]:
    await anyio.sleep(args.ms / 1000)
    return {"value": args.value}
