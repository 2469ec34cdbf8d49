"""A streamable-HTTP MCP server for the tests, written with the ``mcp`` SDK and served by
uvicorn on 127.0.0.1 (a free port the kernel picks; printed as ``PORT <n>`` on stdout).

Unlike ``mcp_fixture_server.py`` (stdio, the protocol by hand) this one is the SDK's own
server, so what Torpor's client does against it is what it does against a real remote
server: sessions, SSE streams, progress, server-to-client requests.  ``--json``: answers as
one JSON body instead of an event stream (the transport's other answer form).

Tools:
  lookup     {customer_id} -> {"id", "name"} (structured + its JSON as text)
  pid        {} -> {"pid": <this process>}
  crash      {} -> the process exits in the middle of the call (a remote crash)
  whoami     {} -> {"authorization": <the request's Authorization header>}
  progress   {steps, every} -> sleeps ``steps`` times ``every`` seconds, reporting progress each
  silent     {seconds} -> sleeps without progress
  sample     {prompt} -> asks the client for a completion (sampling), answers its text
  elicit     {} -> asks the client for a name (elicitation), answers what came back
  elicit_twice {} -> asks for a name, then a colour
  elicit_token {} -> asks a question quoting the request's Authorization header
  roots      {} -> the client's roots
  chatty     {} -> sends a log notification and a resource-updated one, then answers
  big        {n} -> n bytes of text
  counter    {} (annotated read-only) -> a count of calls so far
  peek       {marker, seconds} (annotated read-only) -> appends to marker; the first call sleeps
  charge     {marker, seconds} -> the same, unannotated
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.types import SamplingMessage, TextContent, ToolAnnotations
from pydantic import BaseModel

server = MCPServer("torpor-test-http")
calls = {"counter": 0}


@server.tool()
def lookup(customer_id: str) -> dict[str, str]:
    """Find a customer."""
    return {"id": customer_id, "name": "Ada Lovelace"}


@server.tool()
def pid() -> dict[str, int]:
    """This server's pid."""
    return {"pid": os.getpid()}


@server.tool()
async def crash() -> str:
    """Dies mid-call."""
    await asyncio.sleep(0.05)
    os._exit(3)


@server.tool()
def whoami(ctx: Context) -> dict[str, str]:
    """The Authorization header this call came with."""
    request = ctx.request_context.request
    headers = getattr(request, "headers", None) or {}
    return {"authorization": headers.get("authorization", "")}


@server.tool()
async def progress(steps: int, every: float, ctx: Context) -> dict[str, int]:
    """Sleeps ``steps`` x ``every`` seconds, reporting progress after each."""
    for i in range(steps):
        await asyncio.sleep(every)
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
    return {"steps": steps}


@server.tool()
async def silent(seconds: float) -> dict[str, float]:
    """Sleeps without a word."""
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@server.tool()
async def sample(prompt: str, ctx: Context) -> str:
    """Asks the client's model."""
    result = await ctx.session.create_message(
        [SamplingMessage(role="user", content=TextContent(type="text", text=prompt))], max_tokens=50,
        related_request_id=ctx.request_id)
    content = result.content
    return content.text if isinstance(content, TextContent) else str(content)


class Name(BaseModel):
    name: str


@server.tool()
async def elicit(ctx: Context) -> str:
    """Asks the client's user for a name."""
    result = await ctx.elicit("What is your name?", Name)
    return f"{result.action}:{getattr(getattr(result, 'data', None), 'name', '')}"


@server.tool()
async def elicit_token(ctx: Context) -> str:
    """Asks a question that quotes the Authorization header it was called with (a server
    that leaks the credential it was given into the question a person is shown)."""
    request = ctx.request_context.request
    headers = getattr(request, "headers", None) or {}
    result = await ctx.elicit(f"Is {headers.get('authorization', '')} your key?", Name)
    return f"{result.action}:{getattr(getattr(result, 'data', None), 'name', '')}"


class Colour(BaseModel):
    colour: str


@server.tool()
async def elicit_twice(ctx: Context) -> str:
    """Asks for a name, then for a colour."""
    first = await ctx.elicit("What is your name?", Name)
    second = await ctx.elicit("Which colour?", Colour)
    return (f"{first.action}:{getattr(getattr(first, 'data', None), 'name', '')},"
            f"{second.action}:{getattr(getattr(second, 'data', None), 'colour', '')}")


@server.tool()
async def roots(ctx: Context) -> list[str]:
    """The client's roots."""
    listing = await ctx.session.list_roots()
    return [str(r.uri) for r in listing.roots]


@server.tool()
async def chatty(ctx: Context) -> str:
    """Logs, then answers."""
    await ctx.info("halfway there")
    await ctx.session.send_resource_updated("file:///srv/data/report.csv")
    return "done"


@server.tool()
def big(n: int) -> str:
    """n bytes of text."""
    return "x" * n


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def counter() -> dict[str, int]:
    """Counts its calls (read-only as far as the world is concerned)."""
    calls["counter"] += 1
    return {"count": calls["counter"]}


async def _marked(marker: str, seconds: float) -> dict[str, int]:
    """Appends a line to ``marker``; the first call of a marker then sleeps (a host is killed meanwhile)."""
    first = not os.path.exists(marker)
    with open(marker, "a") as f:
        f.write("started\n")
    if first:
        await asyncio.sleep(seconds)
    with open(marker) as f:
        return {"runs": len(f.readlines())}


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
async def peek(marker: str, seconds: float) -> dict[str, int]:
    """A read-only look (annotated so); the first one is slow."""
    return await _marked(marker, seconds)


@server.tool()
async def charge(marker: str, seconds: float) -> dict[str, int]:
    """The same work, unannotated: as far as the client knows, it changes the world."""
    return await _marked(marker, seconds)


def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    app = server.streamable_http_app(host="127.0.0.1", json_response="--json" in sys.argv)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    sys.exit(main())
