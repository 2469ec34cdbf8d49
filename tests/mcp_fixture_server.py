"""A small MCP server (stdio, newline-delimited JSON-RPC) for the tests: well-behaved
tools, and tools that misbehave on purpose.

It speaks the protocol by hand rather than through the SDK's server classes so
that it can do what a real SDK would never let it do: die in the middle of a
call, publish a schema it does not honour, or answer with garbage.  It starts in
a few milliseconds (no imports beyond the standard library).

Tools:
  lookup_customer  {customer_id: "C-<digits>"} -> the customer (text + structuredContent)
  pid              {} -> {"pid": <this process>} (tells a restart apart)
  crash            {} -> the process exits in the middle of the call
  slow             {seconds: number} -> sleeps, then answers
  fail             {} -> a tool-level error (isError: true)
  lie_output       {} -> structuredContent that violates its own outputSchema
  lie_input        {x: integer} -> refuses every call with "invalid params"
  leak_env         {how} -> hands back $CRM_TOKEN (result, escaped text, tool error, JSON-RPC error)
  big              {n} -> a text of n bytes (written in pieces)
  as_task          {} (execution.taskSupport = required): never called by Torpor
  environment      {} -> {"environ": the environment this process was started with, "cwd": its directory}
  list_roots       {} -> {"roots": what the client answers to a roots/list request, asked mid-call}
  bad_schema       an inputSchema that is not a JSON Schema
Flags: --garbage-after-init (answer tools/list with a non-JSON line).
"""

from __future__ import annotations

import json
import os
import sys
import time

CUSTOMERS = {
    "C-42": {"id": "C-42", "name": "Ada Lovelace", "plan": "enterprise", "open_tickets": 2},
    "C-7": {"id": "C-7", "name": "Alan Turing", "plan": "free", "open_tickets": 0},
}

TOOLS = [
    {
        "name": "lookup_customer",
        "description": "Find a customer by id.",
        "inputSchema": {
            "type": "object",
            "properties": {"customer_id": {"type": "string", "pattern": "^C-[0-9]+$"}},
            "required": ["customer_id"],
            "additionalProperties": False,
        },
        "outputSchema": {
            "type": "object",
            "properties": {"id": {"type": "string"}, "name": {"type": "string"}, "plan": {"type": "string"},
                           "open_tickets": {"type": "integer"}},
            "required": ["id", "name"],
        },
    },
    {"name": "pid", "description": "This server's pid.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "crash", "description": "Dies mid-call.", "inputSchema": {"type": "object", "properties": {}}},
    {
        "name": "slow",
        "description": "Sleeps.",
        "inputSchema": {"type": "object", "properties": {"seconds": {"type": "number", "minimum": 0}},
                        "required": ["seconds"]},
    },
    {"name": "fail", "description": "Fails as a tool.", "inputSchema": {"type": "object"}},
    {
        "name": "lie_output",
        "description": "Breaks its own output schema.",
        "inputSchema": {"type": "object"},
        "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    },
    {
        "name": "lie_input",
        "description": "Rejects what its schema accepts.",
        "inputSchema": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
    },
    {
        "name": "leak_env",
        "description": "Tries to hand its environment's CRM_TOKEN back: in its result, escaped, and as an error.",
        "inputSchema": {"type": "object", "properties": {"how": {"type": "string"}}, "required": ["how"]},
    },
    {
        "name": "big",
        "description": "n bytes of text, written in 1 MiB pieces.",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"]},
    },
    {
        "name": "as_task",
        "description": "Runs only as a task.",
        "inputSchema": {"type": "object"},
        "execution": {"taskSupport": "required"},
    },
    {"name": "environment", "description": "The environment it was started with.", "inputSchema": {"type": "object"}},
    {"name": "list_roots", "description": "Asks the client for its roots.", "inputSchema": {"type": "object"}},
    {
        "name": "bad_schema",
        "description": "Publishes an invalid schema.",
        "inputSchema": {"type": "object", "properties": {"x": {"type": "nonsense"}}},
    },
]


def send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def result(req_id: object, value: dict) -> None:
    send({"jsonrpc": "2.0", "id": req_id, "result": value})


def error(req_id: object, code: int, message: str) -> None:
    send({"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}})


def text(value: object, *, structured: bool = True, is_error: bool = False) -> dict:
    out: dict = {"content": [{"type": "text", "text": json.dumps(value)}], "isError": is_error}
    if structured:
        out["structuredContent"] = value
    return out


def call(req_id: object, name: str, args: dict) -> None:
    if name == "lookup_customer":
        c = CUSTOMERS.get(args.get("customer_id", ""))
        if c is None:
            result(req_id, text({"error": f"no customer {args.get('customer_id')}"}, structured=False, is_error=True))
        else:
            result(req_id, text(c))
    elif name == "pid":
        result(req_id, text({"pid": os.getpid()}))
    elif name == "environment":  # as exec'd: Python itself may add LC_CTYPE to os.environ
        with open("/proc/self/environ", "rb") as f:
            pairs = [e.decode().partition("=") for e in f.read().split(b"\0") if e]
        result(req_id, text({"environ": {k: v for k, _, v in pairs}, "cwd": os.getcwd()}))
    elif name == "list_roots":  # a request of the server's own, answered by the client mid-call
        send({"jsonrpc": "2.0", "id": "roots-1", "method": "roots/list"})
        for line in sys.stdin:
            msg = json.loads(line) if line.strip() else {}
            if msg.get("id") == "roots-1":
                result(req_id, text({"roots": (msg.get("result") or {}).get("roots"), "error": msg.get("error")}))
                return
    elif name == "crash":
        sys.stdout.flush()
        os._exit(3)
    elif name == "slow":
        time.sleep(float(args.get("seconds", 0)))
        result(req_id, text({"slept": args.get("seconds")}))
    elif name == "fail":
        result(req_id, {"content": [{"type": "text", "text": "the widget is jammed"}], "isError": True})
    elif name == "big":  # written in pieces, so that this process never holds it either
        n = int(args.get("n", 0))
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": req_id})[:-1] + ', "result": {"content": [{"type": "text", "text": "')
        piece = "x" * (1 << 20)
        while n > 0:
            sys.stdout.write(piece[:n])
            n -= len(piece)
        sys.stdout.write('"}]}}\n')
        sys.stdout.flush()
    elif name == "lie_output":
        result(req_id, text({"n": "not a number"}))
    elif name == "lie_input":
        error(req_id, -32602, "Invalid params: x")
    elif name == "leak_env":
        token = os.environ.get("CRM_TOKEN", "")
        how = args.get("how")
        if how == "error":
            result(req_id, {"content": [{"type": "text", "text": f"bad token {token}"}], "isError": True})
        elif how == "rpc_error":
            error(req_id, -32000 - 1, f"refused {token}")
        elif how == "escaped":  # the token JSON-escaped inside a text block
            result(req_id, {"content": [{"type": "text", "text": json.dumps({"t": token}).replace(token[:2], f"\\u{ord(token[0]):04x}\\u{ord(token[1]):04x}")}]})
        else:
            result(req_id, text({"token": token, "nested": [{"deep": {"k": token}}]}))
    else:
        error(req_id, -32602, f"Unknown tool: {name}")


def main() -> None:
    garbage = "--garbage-after-init" in sys.argv
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        method, req_id = msg.get("method"), msg.get("id")
        if req_id is None:
            continue  # a notification
        if method == "initialize":
            asked = (msg.get("params") or {}).get("protocolVersion")
            known = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
            result(req_id, {
                "protocolVersion": asked if asked in known else known[-1],
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "torpor-test-mcp", "version": "1.0"},
            })
        elif method == "tools/list":
            if garbage:
                sys.stdout.write("this is not json\n")
                sys.stdout.flush()
                os._exit(4)
            result(req_id, {"tools": TOOLS})
        elif method == "tools/call":
            params = msg.get("params") or {}
            call(req_id, params.get("name", ""), params.get("arguments") or {})
        elif method == "ping":
            result(req_id, {})
        else:
            error(req_id, -32601, f"Method not found: {method}")


if __name__ == "__main__":
    main()
