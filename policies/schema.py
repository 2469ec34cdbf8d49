"""The policy file: schema, loader and reference.

Policy file reference (``policy.toml``)
=======================================

Every agent bundle carries one ``policy.toml``.  It says who the agent is, what
it may spend, which tools it may call with which arguments and how often, what
must never leave it, and which WASI imports it may use.  Anything the policy
does not grant is refused: the host links only granted imports, and every tool
call passes through :func:`policies.decide` before the tool runs.

The file is checked when it is loaded.  Unknown keys and typos are errors that
name the file, the field's full dotted path and the nearest valid key::

    policy.toml: [budgets] unknown key 'tokns' — did you mean 'tokens'?

Wrong types and bad values (a negative budget, ``"5 parsecs"``, a regex or an
approval condition that does not parse) name the field too, and all problems
are reported at once.

Units
-----
* **durations**: a number of seconds, or a string of number+unit parts with
  units ``ms``, ``s``, ``m`` (or ``min``), ``h``, ``d``: ``"500ms"``,
  ``"30s"``, ``"5m"``, ``"1h30m"``, ``"7d"``.  Must be greater than zero.
* **sizes**: an integer number of bytes, or a string with ``B``, ``KiB``,
  ``MiB``, ``GiB``: ``"32MiB"``.  ``"MB"`` is refused as ambiguous.
* **rates**: ``"N/unit"`` or ``"N/<duration>"``: ``"100/s"``, ``"10/min"``,
  ``"1000/h"``, ``"5/10s"``.  A sliding window: at most N calls in any
  window of that length.
* **integers** may use underscores (``50_000_000``), as TOML allows.

[agent] (required)
------------------
``name``         required; lowercase letters, digits, ``_`` and ``-`` (at most 64).
``description``  free text.
``version``      free text (the bundle digest is the authoritative version;
                 this is the human label).
``pool``         the concurrency pool (agent class) the agent runs in;
                 default ``"default"``.  Same naming rule as ``name``.
``priority``     integer; higher runs first when its pool has a queue.  Default 0.
``input_schema`` a JSON Schema (as a TOML table) the agent's input must match;
                 or ``input.schema.json`` beside the agent.  Checked as a
                 schema when the bundle is built and kept in its manifest;
                 ``torpor serve --mcp`` offers it as the tool's input schema
                 and refuses a call whose arguments do not match, naming the
                 field, before any run starts.

[budgets] (all optional; absent means unlimited)
------------------------------------------------
A *run* is one drive of the agent by a host: from spawn (``torpor run``) or
resume (``torpor resume``, ``approve``, ``deny``) until the agent completes,
fails or parks (waiting for approval or an operator).  Tool calls within a
run, and the hibernations they cause, do not start a new run.  *Total*
budgets accumulate over every run of one agent.

``fuel``              Wasmtime fuel per run (positive integer).
``fuel_total``        fuel across all runs.
``memory``            linear-memory cap (size; rounded down to whole 64 KiB pages).
``wall_clock``        time the guest may spend executing per run (duration),
                      enforced by Wasmtime epochs; time waiting on tools is
                      bounded by the tools' own timeouts instead.
``wall_clock_total``  elapsed time since spawn, including time spent waiting
                      hibernated — a deadline for the whole task (duration).
``tool_calls``        total tool calls the agent may make (calls the policy
                      allowed or sent for approval; denied calls are counted as
                      denials instead).
``tokens``            LLM tokens, as reported by tools.
``token_warnings``    fractions of ``tokens`` (each between 0 and 1, exclusive)
                      at which a warning event is recorded, e.g. ``[0.5, 0.8]``.
                      Needs ``tokens``.
``warnings``          fractions at which a warning is recorded for the other
                      cumulative budgets (``fuel_total``, ``wall_clock_total``,
                      ``tool_calls``).
``max_denials``       denials tolerated (non-negative integer); the denial that
                      goes beyond this terminates the agent instead of being
                      returned to it.
``stall_timeout``     a running agent that makes no progress (no tool call, no
                      output) for this long is reported as stalled (duration).

Crossing a limit is "exceeding" it: ``tool_calls = 3`` allows exactly three
calls; ``tokens = 1000`` terminates once more than 1000 tokens are used.

[retention] (optional)
----------------------
``checkpoints``       how many of its newest checkpoints an agent keeps (positive
                      integer); default: all of them, so every checkpoint can be
                      rolled back to, forked from and replayed from.  Older ones are
                      deleted as new ones are written; ``torpor store compact``
                      reclaims the content chunks nothing names any more.

[tools."NAME"] — grants
-----------------------
Each table grants one tool; the tool name is the key (quote it: it has dots).
Builtin tools: ``kv.get``, ``kv.set``, ``kv.incr``, ``clock.now``, ``timer.sleep``,
``log``, ``llm.chat``, ``http.fetch``; and three families, each member configured by its
own grant: ``llm.NAME`` (another ``llm.chat``: a second model or provider),
``http.NAME`` (another ``http.fetch``: other hosts, methods, credentials or an
approval, e.g. ``http.send_reply``) and ``mcp.SERVER.TOOL`` (the tool TOOL of
the MCP server ``[mcp.SERVER]``).  Any other name is a user tool and needs a
``handler``; a grant with a ``handler`` is a user tool whatever its name
(except the exact builtin names, which refuse one).

``handler``      ``"module:function"`` — the Python callable implementing a
                 user tool (the host imports it).  Not allowed on builtins.
``description``  free text.
``idempotent``   whether the call may safely run twice (after a crash).
                 Builtins declare a default (``kv.get``, ``kv.set``,
                 ``clock.now``, ``timer.sleep``: true; ``kv.incr``, ``log``: false); a policy may
                 only tighten it (true → false).  User tools default to false.
``credentials``  names of the secrets the host brokers to this tool's handler
                 (never to agent code).
``rate``         a rate or an array of rates (all must hold), e.g.
                 ``["10/s", "1000/h"]``.  Denied calls do not count.
``rate_scope``   whose calls a rate counts: ``agent`` (default: this agent's),
                 ``run`` (its current run's), ``policy`` (every agent of this
                 policy's) or ``tenant`` (every agent acting for the same
                 principal); the wider scopes are kept in the store.
``on_limit``     what a call over a ``rate`` gets: ``"deny"`` (default: a
                 ``rate_limited`` answer with ``retry_after_s``) or ``"wait"``
                 (the agent sleeps until the rate lets the call through, then
                 the call is decided again; past 50 ms it is hibernated
                 ``sleeping`` and woken by ``torpor serve`` or ``torpor resume
                 --all``).  A wait that would end after ``max_wait`` or after
                 the run's ``budgets.wall_clock`` / ``wall_clock_total`` is
                 denied as with ``"deny"``.
``max_wait``     the longest one call may wait under ``on_limit = "wait"``
                 (a duration such as ``"30s"``); default: up to the budgets.
``max_calls``    total calls of this tool over the agent's life.
``approval``     ``true`` (every call needs a human), ``false`` (none), or a
                 table ``{ when = "CONDITION", reason = "TEXT" }``; without
                 ``when`` every call needs approval.

``[tools."NAME".args.PATH]`` — argument constraints.  PATH is a dotted path
into the JSON arguments; quote it when it has dots:
``[tools."x".args."vendor.id"]``.  Digits select array elements
(``items.0``) and ``*`` every element or value (``items.*.price``: the
constraint applies to each).  Keys:

``required``        true: the argument must be present.
``forbidden``       true: the argument must be absent (no other key allowed).
``type``            one of ``string``, ``number``, ``integer``, ``boolean``,
                    ``array``, ``object``, ``null``.
``allow``           array of allowed values (strings, numbers, booleans).
``deny``            array of refused values.
``pattern``         regular expression (Python ``re``, searched) a string must match.
``forbid_pattern``  regular expression a value must not match (non-strings are
                    matched in their JSON form).
``min``, ``max``    inclusive numeric bounds (the value must be a number).
``min_length``, ``max_length``  bounds on a string's or array's length.

When the value is an array, ``allow``, ``deny``, ``pattern``,
``forbid_pattern``, ``min`` and ``max`` apply to each element; ``type`` and the
length bounds apply to the array itself.  An absent argument passes every
constraint except ``required``.

Approval conditions
~~~~~~~~~~~~~~~~~~~
``when`` is a one-line condition over the call's arguments: comparisons
``> >= < <= == !=`` between an argument path and a literal (number, string in
single or double quotes, ``true``, ``false``, ``null``), combined with ``and``,
``or``, ``not`` and parentheses (``not`` binds tightest, then ``and``, then
``or``).  A path alone is true when the argument is ``true``.  Examples::

    amount > 50000
    amount > 10_000 and (vendor.new or not vendor.verified)
    currency != "EUR" or amount >= 1e6

If the condition cannot be decided (``amount`` missing, or a string), approval
is required: conditions fail closed.

Tool settings
~~~~~~~~~~~~~
Keys of a grant that configure one builtin; on any other tool they are an
error.  The host-side modules (``host/tools/llm.py``, ``http.py``, ``mcp.py``)
document the behaviour in full.

``llm.chat`` / ``llm.*``:

``base_url``            required; the API root, e.g. ``"https://api.openai.com/v1"``
                        (``/chat/completions`` or ``/messages`` is appended).
``model``               required; the model every call uses unless the guest
                        picks one of ``models``.
``models``              other models the guest may ask for.
``provider``            ``"openai"`` (default; any OpenAI-compatible server) or
                        ``"anthropic"`` (the Messages API).
``api_key``             the credential sent as the API key; it must be in
                        ``credentials``.  Default: the grant's only credential, if
                        it names exactly one; none means no authentication.
``max_tokens``          cap on (and default for) the guest's ``max_tokens``.
``retries``             retries on 429, 5xx and broken connections (0-10,
                        default 2), with backoff; ``Retry-After`` is honoured up
                        to 30 s.
``timeout``             per attempt (duration, default 60s).
``max_response_bytes``  size cap of an answer (default 1MiB).

``http.fetch`` / ``http.*``:

``hosts``               required allowlist: ``"api.example.com"`` (default port of
                        the scheme), ``"api.example.com:8443"``, ``"*.example.com"``
                        (subdomains only), ``"127.0.0.1:8080"``, ``"[::1]:8080"``.
                        Names are compared after IDNA normalisation; numeric
                        hosts only as canonical dotted quads.
``methods``             allowed methods (default ``["GET"]``).  The grant's
                        default ``idempotent`` is true only for GET, HEAD, OPTIONS.
``allow_private``       ``true``, or addresses/networks (``["127.0.0.1",
                        "10.0.0.0/8"]``) that may be reached although not
                        public.  Otherwise loopback, private, link-local,
                        shared, multicast and unspecified addresses are refused,
                        checked after DNS resolution (and the connection goes
                        to the address checked).
``headers``             headers the host adds to each request:
                        ``{ Authorization = "Bearer {crm_token}" }``; each
                        ``{name}`` must be one of ``credentials``.  The guest
                        can neither set nor see them; they are not sent after a
                        redirect to another origin.
``max_redirects``       redirects followed, each re-checked (0-20, default 5).
``timeout``             for the whole call (duration, default 30s).
``max_response_bytes``  body cap (default 256KiB).

``kv.get``, ``kv.set``, ``kv.incr``:

``namespaces``          shared namespaces this tool may use (the call's
                        ``namespace`` argument); without one a call uses the
                        agent's private namespace.  Read and write are granted
                        separately (a namespace listed only under ``kv.get`` is
                        read-only).

``mcp.SERVER.TOOL``:

``timeout``             per call, overriding the server's.

[mcp.NAME] — MCP servers
------------------------
An MCP server whose tools the agent may call as ``mcp.NAME.TOOL``.  The policy
names the server and says what the agent needs of it (the tools it grants,
their argument rules, its credentials, roots relative to a root the operator
names); how to start or reach the server is the operator's, on the host: the
``[mcp.servers.NAME]`` table of the operator config (``torpor.toml``: a
``command`` with ``args``, ``cwd`` and ``env``, or a ``url`` with ``headers``).
A bundle so built runs on any host whose operator config names the same
servers; one that names a server the host does not configure is refused when
its run starts (``mcp_server_not_configured``).

Deprecated, for local development: ``command``, ``args``, ``env`` and ``cwd``
(a process), or ``url`` and ``headers`` (a streamable-HTTP endpoint), in the
policy itself, and ``file://`` roots.  They are used only where the operator
config does not configure the server (where it does, they are ignored); they
make the bundle machine-specific, and a command line or a URL with headers is
code the host would run or a place it would send the agent's credentials, so
such a bundle runs only for an operator who trusts it
(``--trust-bundle-code DIGEST``), like a bundle carrying Python.
``torpor policy check`` notes each.

``tools``            the server's tools to grant: each becomes a grant
                     ``[tools."mcp.NAME.TOOL"]`` (write that table yourself to
                     add rates, approval or argument rules).  When ``tools`` is
                     given, a grant of an unlisted tool is an error.
``credentials``      secrets the server needs; each ``mcp.NAME.*`` grant gets
                     them (the broker leases them per call), and the operator
                     config's ``{name}`` placeholders in the server's ``env``
                     or ``headers`` are filled with them, and with no others.
``roots``            the roots the server is told (``roots/list``), each a
                     root the operator config names (``[roots] NAME = DIR``)
                     or a relative path under one: ``"data"``,
                     ``"data/reports/2026"``; without it the client declares
                     no roots.
``timeout``          per call (duration, default 30s); a call whose server
                     reports progress is kept alive: each progress
                     notification starts ``timeout`` again, up to
                     ``hard_timeout``.
``hard_timeout``     the longest a call may run whatever its progress
                     (duration, default 10m).
``startup_timeout``  for starting the server and listing its tools (default 10s).
``sampling``         the granted ``llm.*`` tool that answers the server's
                     sampling requests (``sampling/createMessage``) under the
                     agent's policy and token budget; without it a sampling
                     request is refused with an error saying so.
``trust_annotations``  true: the server's tool annotations are believed, so a
                     call of a tool it marks ``readOnlyHint`` or
                     ``idempotentHint`` runs again after a host crash instead
                     of parking the agent ``in_doubt`` (default false).
``elicitation``      true: the server may ask a person mid-call
                     (``elicitation/create``, form mode): the call is cut, the
                     agent parks ``waiting_approval`` with the question, and
                     once answered (``torpor approve --answer JSON``, or
                     declined by ``torpor deny``) the call is made again and the
                     server's same question answered from the journal; so the
                     server must ask before it acts.  Default false: refused.

[[validators]] — output guardrails
----------------------------------
Each validator has ``on`` (where it applies) and exactly one check.

``on``       array of targets: ``"tool:NAME"`` (the arguments of an outbound
             call to a granted tool), ``"tool:*"`` (every tool call), or
             ``"output"`` (the agent's final output).
``action``   what a violation does: ``"deny"`` (default; a structured denial
             the agent can act on, or a failed run for ``output``),
             ``"approval"`` (the call — or the output's release — waits for
             a human), ``"terminate"`` (the agent is stopped).
``reason``   text added to the violation's reason.

Checks (one per validator):

``detect``          array of detectors: ``email``, ``phone``, ``card`` (Luhn
                    checked, network prefix), ``national_id`` (US SSN, UK NINO),
                    ``secret`` (AWS keys, ``sk-…``, GitHub/GitLab/Slack/Stripe
                    tokens, Google API keys, JWTs, PEM private keys,
                    high-entropy bearer tokens and ``api_key = …`` values,
                    passwords).  Every string, integer and key anywhere in the
                    value is scanned.  Denial codes: ``pii_detected`` for
                    the first four, ``secret_detected`` for ``secret``.
                    Strings are normalised first (NFKC, digits of every
                    script, zero-width characters dropped, whitespace folded,
                    line breaks joined).  ``decode = true`` also scans base64
                    and hex runs decoded (a heuristic: off by default).
``spending_limit``  ``{ field = PATH, max = N, action = ..., scope = ...,
                    allow_negative = false }``: the sum of the numbers at PATH
                    (``*`` allowed) must not exceed N.  Code ``spending_limit``.
                    ``scope`` is what the sum covers: ``call`` (default),
                    ``run``, ``agent``, ``policy`` (every agent of this
                    policy) or ``tenant`` (every agent acting for the same
                    principal); wider scopes are persisted by the host.  A
                    non-numeric, non-finite or beyond-64-bit value is a
                    violation, and so is a negative one unless
                    ``allow_negative``; an absent field passes (make it
                    ``required`` in the tool's ``args`` if it must be there),
                    but a field of that name found elsewhere in the arguments
                    (one level deeper, say) is a violation: the limit refuses
                    a shape it does not match.
``rows_affected``   ``{ field = PATH, max = N, action = ... }``: same, for rows
                    touched.  Code ``rows_limit``.
``custom``          ``"module:function"``: a callable the host imports and
                    passes to the engine (see :class:`policies.CustomValidator`);
                    it returns ``None`` to pass or a reason string.  Code
                    ``denied_by_validator``.  A missing or raising custom
                    validator is a violation (fail closed).

``action`` inside ``spending_limit`` / ``rows_affected`` overrides the
validator's ``action``.

[wasi]
------
``allow``  array of WASI preview1 function names the module may import
           (``fd_write``, ``clock_time_get``, ``random_get``, …).  Empty by
           default: no WASI at all.

Rule locators
-------------
Every decision names the rule that made it, written as it reads in the file:
``tools."slack.post".args.channel.allow``, ``tools."kv.incr".rate``,
``tools."erp.create_po".approval``, ``validators[0].detect.card``,
``budgets.tokens``.  ``tools`` alone means "no grant for this tool".
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .detectors import DETECTORS
from .errors import PolicyError, PolicyIssue
from .expr import Condition
from .paths import locator, parse_path
from .units import RateLimit, format_duration, parse_duration, parse_rate, parse_size, type_name

# --- constants the host shares -------------------------------------------------------


@dataclass(frozen=True)
class BuiltinTool:
    """A tool the host provides itself; ``idempotent`` is its declared default."""

    name: str
    idempotent: bool
    description: str


BUILTIN_TOOLS: Mapping[str, BuiltinTool] = {
    t.name: t
    for t in (
        BuiltinTool("kv.get", True, "read a key from the agent's key-value store"),
        BuiltinTool("kv.set", True, "write a key in the agent's key-value store"),
        BuiltinTool("kv.incr", False, "add to an integer key and return the new value"),
        BuiltinTool("clock.now", True, "the current time"),
        BuiltinTool("log", False, "write a line to the agent's log"),
        # Declared idempotent: waiting again after a crash changes nothing outside the host
        # (and the wake time is journaled with the call, so it is the same deadline).
        BuiltinTool("timer.sleep", True, "wait some milliseconds or until a time, durably (hibernated when long)"),
        # Declared idempotent: a re-run after a crash has no effect outside the host
        # (it may spend tokens again).  A policy may tighten it.
        BuiltinTool("llm.chat", True, "a chat completion from the LLM the grant names"),
        # The most a grant may claim; the default follows the grant's methods
        # (idempotent only when every method is GET, HEAD or OPTIONS).
        BuiltinTool("http.fetch", True, "an HTTP request to a host on the grant's allowlist"),
    )
}

TOOL_FAMILIES: Mapping[str, str] = {"llm": "llm.chat", "http": "http.fetch"}
"""Name prefix → builtin: ``llm.NAME`` is another ``llm.chat`` and ``http.NAME`` another
``http.fetch``, each configured by its own grant (a second model, a second API with
its own credentials, a send that needs approval)."""

MCP_PREFIX = "mcp."
"""``mcp.SERVER.TOOL`` names the tool TOOL of the MCP server ``[mcp.SERVER]``."""

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
HTTP_METHODS = ("GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE")

# Which grant keys configure which builtin ("mcp" stands for every mcp.SERVER.TOOL).
TOOL_SETTINGS: Mapping[str, frozenset[str]] = {
    "llm.chat": frozenset(
        {"provider", "base_url", "model", "models", "max_tokens", "api_key", "retries", "timeout",
         "max_response_bytes"}
    ),
    "http.fetch": frozenset(
        {"hosts", "methods", "allow_private", "headers", "max_redirects", "timeout", "max_response_bytes"}
    ),
    "kv.get": frozenset({"namespaces"}),
    "kv.set": frozenset({"namespaces"}),
    "kv.incr": frozenset({"namespaces"}),
    "mcp": frozenset({"timeout"}),
}
_ALL_SETTINGS = frozenset().union(*TOOL_SETTINGS.values())


def tool_kind(name: str, has_handler: bool = False) -> str | None:
    """Which builtin implements the tool ``name``: a builtin's own name, ``llm.chat`` for
    ``llm.*``, ``http.fetch`` for ``http.*``, ``"mcp"`` for ``mcp.SERVER.TOOL``, or None
    (a user tool).  A grant with a ``handler`` is a user tool whatever its name, except
    for the exact builtin names (which refuse a handler)."""
    if name in BUILTIN_TOOLS:
        return name
    if has_handler:
        return None
    head, dot, rest = name.partition(".")
    if dot and rest and head in TOOL_FAMILIES:
        return TOOL_FAMILIES[head]
    if name.startswith(MCP_PREFIX) and mcp_tool_parts(name) is not None:
        return "mcp"
    return None


def mcp_tool_parts(name: str) -> tuple[str, str] | None:
    """``mcp.SERVER.TOOL`` → ``(SERVER, TOOL)`` (TOOL may contain dots), else None."""
    if not name.startswith(MCP_PREFIX):
        return None
    server, dot, tool = name[len(MCP_PREFIX) :].partition(".")
    if not server or not dot or not tool:
        return None
    return server, tool


def default_idempotent(kind: str, grant: Mapping[str, Any]) -> bool:
    """The ``idempotent`` a grant of builtin ``kind`` gets when it does not say."""
    if kind == "http.fetch":
        methods = grant.get("methods", ("GET",))
        if isinstance(methods, list | tuple) and all(isinstance(m, str) for m in methods):
            return {m.upper() for m in methods} <= _SAFE_METHODS
        return False
    builtin = BUILTIN_TOOLS.get(kind)
    return builtin.idempotent if builtin is not None else False


def canonical_host(host: str) -> str:
    """A host name as compared against allowlists: IDNA (UTS 46) ASCII, lowercase, no
    trailing dot; IPv6 without brackets, compressed.  Raises ValueError.

    One function for the policy and the HTTP tool, so an allowlist entry and a
    URL's host are normalised the same way: a homograph (Cyrillic ``а`` for ``a``)
    becomes a different punycode name and cannot match an ASCII entry.
    """
    import ipaddress

    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if ":" in h:
        if "%" in h:
            raise ValueError(f"{host!r}: IPv6 zone identifiers are not allowed")
        try:
            return ipaddress.IPv6Address(h).compressed
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    if h.endswith("."):
        h = h[:-1]
    if not h or len(h) > 253:
        raise ValueError(f"{host!r} is not a valid host name")
    if any(c in h for c in "%@/\\?#[] \t\r\n") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in h):
        raise ValueError(f"{host!r} contains a character a host name cannot have")
    if not h.isascii():
        import idna

        try:
            h = idna.encode(h, uts46=True, transitional=False).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"{host!r} is not a valid internationalised host name: {exc}") from None
    h = h.lower()
    last = h.rsplit(".", 1)[-1]
    if re.fullmatch(r"[0-9]+|0x[0-9a-f]*", last):
        # WHATWG: a host whose last label is a number is an IPv4 address.  Resolvers
        # also read 2130706433, 0x7f.1 and 0177.0.0.1 as 127.0.0.1; only the
        # canonical dotted quad is accepted, so every check sees the real address.
        try:
            if str(ipaddress.IPv4Address(h)) == h:
                return h
        except ValueError:
            pass
        raise ValueError(
            f"{host!r} is not a canonical IPv4 address; write it as a dotted quad such as 192.0.2.1"
        )
    for label in h.split("."):
        if not label or len(label) > 63 or not re.fullmatch(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?", label):
            raise ValueError(f"{host!r} is not a valid host name (label {label!r})")
    return h


def parse_host_pattern(entry: str) -> tuple[bool, str, int | None]:
    """An allowlist entry → ``(wildcard, host, port)``.

    ``api.example.com`` (default ports: 443 for https, 80 for http),
    ``api.example.com:8443``, ``*.example.com`` (any subdomain, not the
    domain itself), ``127.0.0.1:8080``, ``[::1]:8080``.  Raises ValueError.
    """
    text = entry.strip()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    port: int | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{entry!r}: unclosed '['")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{entry!r}: unexpected {rest!r} after the IPv6 address")
            port = _port(rest[1:], entry)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, entry)
    else:
        host = text
    if wildcard and ":" in host:
        raise ValueError(f"{entry!r}: a wildcard needs a domain name, not an address")
    canon = canonical_host(host)
    if wildcard and re.fullmatch(r"[0-9.]+", canon):
        raise ValueError(f"{entry!r}: a wildcard needs a domain name, not an address")
    return wildcard, canon, port


def _port(text: str, entry: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 0 < int(text) < 65536:
        raise ValueError(f"{entry!r}: {text!r} is not a port number (1-65535)")
    return int(text)


def format_host_pattern(wildcard: bool, host: str, port: int | None) -> str:
    """The canonical text of an allowlist entry (what the loaded policy holds)."""
    h = f"[{host}]" if ":" in host else host
    return ("*." if wildcard else "") + h + (f":{port}" if port is not None else "")

WASI_PREVIEW1: frozenset[str] = frozenset(
    (
        "args_get",
        "args_sizes_get",
        "environ_get",
        "environ_sizes_get",
        "clock_res_get",
        "clock_time_get",
        "fd_advise",
        "fd_allocate",
        "fd_close",
        "fd_datasync",
        "fd_fdstat_get",
        "fd_fdstat_set_flags",
        "fd_fdstat_set_rights",
        "fd_filestat_get",
        "fd_filestat_set_size",
        "fd_filestat_set_times",
        "fd_pread",
        "fd_prestat_get",
        "fd_prestat_dir_name",
        "fd_pwrite",
        "fd_read",
        "fd_readdir",
        "fd_renumber",
        "fd_seek",
        "fd_sync",
        "fd_tell",
        "fd_write",
        "path_create_directory",
        "path_filestat_get",
        "path_filestat_set_times",
        "path_link",
        "path_open",
        "path_readlink",
        "path_remove_directory",
        "path_rename",
        "path_symlink",
        "path_unlink_file",
        "poll_oneoff",
        "proc_exit",
        "proc_raise",
        "sched_yield",
        "random_get",
        "sock_accept",
        "sock_recv",
        "sock_send",
        "sock_shutdown",
    )
)
"""Every function of ``wasi_snapshot_preview1`` a policy may name in ``[wasi] allow``."""

ACTIONS = ("deny", "approval", "terminate")
ARG_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")

_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
_REF = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_CREDENTIAL = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _suggest(word: str, choices: list[str] | tuple[str, ...] | frozenset[str]) -> str | None:
    found = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _custom_error(message: str, suggestion: str | None) -> PydanticCustomError:
    """A validation error whose message is final and which carries a suggestion for :class:`PolicyError`."""
    # pydantic fills only ``{key}`` fields named in the context, and the only key is
    # ``suggestion``; the message itself is already formatted.
    return PydanticCustomError("policy_value", message, {"suggestion": suggestion or ""})


def _choice_error(
    what: str, value: str, choices: list[str] | tuple[str, ...] | frozenset[str]
) -> PydanticCustomError:
    """A value outside a closed set; carries the nearest valid one as ``suggestion``."""
    suggestion = _suggest(value, choices)
    hint = (
        f" — did you mean {suggestion!r}?"
        if suggestion
        else f"; valid: {', '.join(sorted(choices))}"
    )
    return _custom_error(f"unknown {what} {value!r}{hint}", suggestion)


# --- field types ----------------------------------------------------------------------


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {type_name(value)}")
    return value


def _non_negative_number(value: object) -> int | float:
    n = _number(value)
    if n < 0:
        raise ValueError(f"must not be negative (got {n})")
    return n


def _regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {type_name(value)}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


def _condition(value: object) -> Condition:
    if not isinstance(value, str):
        raise ValueError(
            f"expected a condition string such as 'amount > 50000', got {type_name(value)}"
        )
    return Condition.parse(value)


def _rates(value: object) -> tuple[RateLimit, ...]:
    if isinstance(value, str):
        return (parse_rate(value),)
    if isinstance(value, list | tuple):
        return tuple(parse_rate(v) for v in value)
    raise ValueError(
        f'expected a rate such as "100/s" or an array of rates, got {type_name(value)}'
    )


def _ref(value: object) -> str:
    if not isinstance(value, str) or not _REF.match(value):
        shown = repr(value) if isinstance(value, str) else type_name(value)
        raise ValueError(
            f"expected 'module:function' (e.g. 'procurement_tools:create_po'), got {shown}"
        )
    return value


def _scalar_list(value: object) -> tuple[str | int | float | bool, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of values, got {type_name(value)}")
    for i, v in enumerate(value):
        if not isinstance(v, str | int | float | bool):
            raise ValueError(
                f"item {i} is {type_name(v)}; only strings, numbers and booleans can be listed"
            )
    return tuple(value)


PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
Duration = Annotated[float, PlainValidator(parse_duration)]
Size = Annotated[int, PlainValidator(parse_size)]
Number = Annotated[float, PlainValidator(_number), PlainSerializer(lambda x: x, return_type=Any)]
NonNegativeNumber = Annotated[
    float, PlainValidator(_non_negative_number), PlainSerializer(lambda x: x, return_type=Any)
]
Regex = Annotated[
    re.Pattern[str], PlainValidator(_regex), PlainSerializer(lambda p: p.pattern, return_type=str)
]
ConditionField = Annotated[
    Condition, PlainValidator(_condition), PlainSerializer(str, return_type=str)
]
Rates = Annotated[
    tuple[RateLimit, ...],
    PlainValidator(_rates),
    PlainSerializer(lambda rs: [r.text for r in rs], return_type=list[str]),
]
Ref = Annotated[str, PlainValidator(_ref)]
ScalarList = Annotated[
    tuple[str | int | float | bool, ...],
    PlainValidator(_scalar_list),
    PlainSerializer(list, return_type=list[str | int | float | bool]),
]


class _Model(BaseModel):
    """Closed, immutable models: a key the schema does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


# --- sections -------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-")[:64] or "agent"


class AgentSpec(_Model):
    """``[agent]``: who the agent is and where it queues."""

    name: StrictStr
    description: StrictStr = ""
    version: StrictStr | None = None
    pool: StrictStr = "default"
    priority: StrictInt = 0
    input_schema: dict[str, Any] | None = None

    @field_validator("name", "pool")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise _custom_error(
                f"{v!r} is not a valid name; use 1-64 lowercase letters, digits, '_' and '-', e.g. {_slug(v)!r}",
                _slug(v),
            )
        return v


class Budgets(_Model):
    """``[budgets]``, resolved: bytes for sizes, seconds for durations, ``None`` for unlimited."""

    fuel: PositiveInt | None = None
    fuel_total: PositiveInt | None = None
    memory: Size | None = None
    wall_clock: Duration | None = None
    wall_clock_total: Duration | None = None
    tool_calls: NonNegativeInt | None = None
    tokens: NonNegativeInt | None = None
    token_warnings: tuple[float, ...] = ()
    warnings: tuple[float, ...] = ()
    max_denials: NonNegativeInt | None = None
    stall_timeout: Duration | None = None

    @field_validator("token_warnings", "warnings", mode="before")
    @classmethod
    def _fractions(cls, v: object) -> tuple[float, ...]:
        if not isinstance(v, list | tuple):
            raise ValueError(
                f"expected an array of fractions such as [0.5, 0.8], got {type_name(v)}"
            )
        out: list[float] = []
        for x in v:
            if isinstance(x, bool) or not isinstance(x, int | float) or not 0 < x < 1:
                raise ValueError(
                    f"each threshold must be a fraction between 0 and 1 (exclusive), e.g. 0.8; got {x!r}"
                )
            out.append(float(x))
        if len(set(out)) != len(out):
            raise ValueError("thresholds must not repeat")
        return tuple(sorted(out))


class Retention(_Model):
    """``[retention]``: how much of an agent's history the store keeps."""

    #: The newest checkpoints kept per agent; ``None`` keeps all (every one can be rolled
    #: back to, forked from and replayed from). Older ones are deleted as new ones are
    #: written; ``torpor store compact`` then reclaims the chunks nothing else names.
    checkpoints: PositiveInt | None = None


def _is_set(value: object) -> bool:
    """Whether a constraint key is in use (``min = 0`` is; ``required = false`` is not)."""
    return value is not None and value is not False and value != ()


class ArgConstraint(_Model):
    """Constraints on one argument path of one tool."""

    required: StrictBool = False
    forbidden: StrictBool = False
    type: Literal["string", "number", "integer", "boolean", "array", "object", "null"] | None = None
    allow: ScalarList | None = None
    deny: ScalarList = ()
    pattern: Regex | None = None
    forbid_pattern: Regex | None = None
    min: Number | None = None
    max: Number | None = None
    min_length: NonNegativeInt | None = None
    max_length: NonNegativeInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ArgConstraint:
        if self.forbidden:
            others = [k for k in self.keys_set() if k != "forbidden"]
            if others:
                raise ValueError(
                    f"forbidden = true cannot be combined with {', '.join(sorted(others))}: "
                    "a forbidden argument has no value to check"
                )
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(
                f"min ({self.min}) is greater than max ({self.max}); no value could pass"
            )
        if (
            self.min_length is not None
            and self.max_length is not None
            and self.min_length > self.max_length
        ):
            raise ValueError(
                f"min_length ({self.min_length}) is greater than max_length ({self.max_length})"
            )
        if self.allow is not None and not self.allow:
            raise ValueError(
                "allow = [] would refuse every value; use forbidden = true to refuse the argument"
            )
        return self

    @cached_property
    def keys_in_use(self) -> tuple[str, ...]:
        """:meth:`keys_set`, computed once (the engine asks on every call)."""
        return self.keys_set()

    def keys_set(self) -> tuple[str, ...]:
        """The constraint keys in use, in a stable order (for rule locators)."""
        return tuple(k for k in type(self).model_fields if _is_set(getattr(self, k)))


class Approval(_Model):
    """``approval = { when = ..., reason = ... }``; no ``when`` means always."""

    when: ConditionField | None = None
    reason: StrictStr = "this call needs a human's approval"


def _approval(value: object) -> object:
    if value is True:
        return {}
    if value is False:
        return None
    return value


def _hosts(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(
            'expected a non-empty array of hosts such as ["api.example.com", "127.0.0.1:8080"]'
        )
    out: list[str] = []
    for v in value:
        if not isinstance(v, str):
            raise ValueError(f"expected host strings, got {type_name(v)}")
        out.append(format_host_pattern(*parse_host_pattern(v)))
    return tuple(dict.fromkeys(out))


def _methods(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError('expected a non-empty array of HTTP methods such as ["GET"]')
    out: list[str] = []
    for v in value:
        if not isinstance(v, str) or v.upper() not in HTTP_METHODS:
            shown = repr(v) if isinstance(v, str) else type_name(v)
            raise _choice_error("HTTP method", str(v).upper() if isinstance(v, str) else shown, HTTP_METHODS)
        out.append(v.upper())
    return tuple(dict.fromkeys(out))


def _allow_private(value: object) -> bool | tuple[str, ...]:
    import ipaddress

    if isinstance(value, bool):
        return value
    if not isinstance(value, list | tuple):
        raise ValueError(
            'expected true, false or an array of addresses/networks such as ["127.0.0.1", "10.0.0.0/8"]'
        )
    out: list[str] = []
    for v in value:
        if not isinstance(v, str):
            raise ValueError(f"expected address strings, got {type_name(v)}")
        try:
            out.append(str(ipaddress.ip_network(v.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address or network (CIDR)") from None
    return tuple(dict.fromkeys(out))


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
     "trailer", "proxy-authorization", "proxy-connection"}
)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


def placeholders(text: str) -> list[str]:
    """The ``{credential}`` names a header or env template uses."""
    return _PLACEHOLDER.findall(text)


def fill_placeholders(text: str, secrets: Mapping[str, str]) -> str:
    """Replace each ``{name}`` by ``secrets[name]`` (host side; KeyError if missing)."""
    return _PLACEHOLDER.sub(lambda m: secrets[m.group(1)], text)


def _headers(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f'expected a table of headers such as {{ Authorization = "Bearer {{token}}" }}, got {type_name(value)}')
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _HEADER_NAME.match(k):
            raise ValueError(f"{k!r} is not a valid header name")
        if k.lower() in _HOP_HEADERS:
            raise ValueError(f"header {k!r} is set by the host and cannot be configured")
        if not isinstance(v, str) or any(c in v for c in "\r\n\x00"):
            raise ValueError(f"header {k!r}: expected a one-line string")
        out[k] = v
    return out


def _base_url(value: object) -> str:
    from urllib.parse import urlsplit

    if not isinstance(value, str):
        raise ValueError(f"expected a URL string, got {type_name(value)}")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL such as 'https://api.openai.com/v1'")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{value!r}: a base URL has no credentials, query or fragment")
    return value.strip().rstrip("/")


def _namespaces(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f'expected an array of namespace names such as ["team-notes"], got {type_name(value)}')
    for v in value:
        if not isinstance(v, str) or not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a namespace name; use 1-64 lowercase letters, digits, '_' and '-'"
            )
    return tuple(dict.fromkeys(value))


def _response_cap(value: object) -> int:
    n = parse_size(value)
    if not 0 < n <= 64 << 20:
        raise ValueError(f"must be between 1 B and 64MiB (got {n:,} bytes)")
    return n


ResponseCap = Annotated[int, PlainValidator(_response_cap)]
Hosts = Annotated[tuple[str, ...], PlainValidator(_hosts), PlainSerializer(list, return_type=list[str])]
Methods = Annotated[tuple[str, ...], PlainValidator(_methods), PlainSerializer(list, return_type=list[str])]
AllowPrivate = Annotated[
    bool | tuple[str, ...],
    PlainValidator(_allow_private),
    PlainSerializer(lambda v: v if isinstance(v, bool) else list(v), return_type=Any),
]
Headers = Annotated[dict[str, str], PlainValidator(_headers)]
BaseUrl = Annotated[str, PlainValidator(_base_url)]
Namespaces = Annotated[tuple[str, ...], PlainValidator(_namespaces), PlainSerializer(list, return_type=list[str])]


class ToolGrant(_Model):
    """``[tools."NAME"]``: the permission to call one tool, and its limits.

    The settings after ``args`` configure one builtin each (see
    :data:`TOOL_SETTINGS`); a setting on a tool it does not configure is an error.
    """

    handler: Ref | None = None
    description: StrictStr = ""
    idempotent: StrictBool = False
    credentials: tuple[StrictStr, ...] = ()
    rate: Rates = ()
    # What a rate counts: this agent's calls (default), its current run's, every agent of
    # this policy's, or every agent's acting for the same principal (kept in the store).
    rate_scope: Literal["run", "agent", "policy", "tenant"] = "agent"
    # A call over a rate: denied at once with retry_after_s ("deny"), or held until the rate
    # lets it through ("wait": the agent sleeps, hibernated past a moment, and the call is
    # decided again when it wakes), for at most max_wait and never past the run's deadlines.
    on_limit: Literal["deny", "wait"] = "deny"
    max_wait: Duration | None = None
    max_calls: NonNegativeInt | None = None
    approval: Annotated[Approval | None, BeforeValidator(_approval)] = None
    args: dict[str, ArgConstraint] = Field(default_factory=dict)
    # llm.chat / llm.*
    provider: Literal["openai", "anthropic"] | None = None
    base_url: BaseUrl | None = None
    model: StrictStr | None = None
    models: tuple[StrictStr, ...] = ()
    max_tokens: PositiveInt | None = None
    api_key: StrictStr | None = None
    retries: Annotated[int, Field(strict=True, ge=0, le=10)] | None = None
    # http.fetch / http.*
    hosts: Hosts = ()
    methods: Methods = ()
    allow_private: AllowPrivate = False
    headers: Headers = Field(default_factory=dict)
    max_redirects: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    # shared by llm, http and mcp tools
    timeout: Duration | None = None
    max_response_bytes: ResponseCap | None = None
    # kv.*
    namespaces: Namespaces = ()

    def settings_in_use(self) -> tuple[str, ...]:
        """The tool-specific settings this grant sets (for the cross-checks)."""
        return tuple(k for k in sorted(_ALL_SETTINGS) if _is_set(getattr(self, k)) and getattr(self, k) != {})

    @field_validator("credentials")
    @classmethod
    def _credential_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _CREDENTIAL.match(name):
                raise ValueError(
                    f"{name!r} is not a credential name; use letters, digits and '_', e.g. 'erp_token'"
                )
        return v

    @field_validator("args")
    @classmethod
    def _arg_paths(cls, v: dict[str, ArgConstraint]) -> dict[str, ArgConstraint]:
        for key in v:
            parse_path(key)
        return v

    @cached_property
    def constraints(self) -> tuple[tuple[str, tuple[str, ...], ArgConstraint], ...]:
        """``(path text, path segments, constraint)`` for every argument rule, in file order."""
        return tuple((k, parse_path(k), c) for k, c in self.args.items())


class Limit(_Model):
    """``spending_limit`` / ``rows_affected``: the sum of numbers at ``field`` must not exceed ``max``.

    ``scope``: what the sum covers — ``call`` (this call alone, the default), ``run``
    (the agent's current run), ``agent`` (all its runs), ``policy`` (every agent of this
    bundle's policy) or ``tenant`` (every agent acting for the same principal). Wider
    scopes are kept by the host in the store, so a restart does not reset them.
    ``allow_negative``: negative amounts (refunds) are refused unless this is true.
    """

    field: StrictStr
    max: NonNegativeNumber
    action: Literal["deny", "approval", "terminate"] | None = None
    scope: Literal["call", "run", "agent", "policy", "tenant"] = "call"
    allow_negative: StrictBool = False

    @field_validator("field")
    @classmethod
    def _path(cls, v: str) -> str:
        parse_path(v)
        return v

    @cached_property
    def segments(self) -> tuple[str, ...]:
        return parse_path(self.field)


class Validator(_Model):
    """``[[validators]]``: one guardrail on outbound tool arguments and/or the final output."""

    on: tuple[StrictStr, ...]
    detect: tuple[StrictStr, ...] | None = None
    spending_limit: Limit | None = None
    rows_affected: Limit | None = None
    custom: Ref | None = None
    action: Literal["deny", "approval", "terminate"] | None = None
    reason: StrictStr | None = None
    decode: StrictBool = False  # detect: also scan base64 and hex runs, decoded (a heuristic)

    @field_validator("on")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError('on = [] applies nowhere; give e.g. ["tool:slack.post", "output"]')
        for t in v:
            if t == "output" or (t.startswith("tool:") and len(t) > 5):
                continue
            guess = (
                "tool:" + t.split(":", 1)[-1]
                if ":" in t
                else _suggest(t, ["output"]) or f"tool:{t}"
            )
            raise _custom_error(
                f"unknown target {t!r} — did you mean {guess!r}? Targets are 'tool:NAME', 'tool:*' or 'output'",
                guess,
            )
        return v

    @field_validator("detect")
    @classmethod
    def _detectors(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        if not v:
            raise ValueError(f"detect = [] detects nothing; list some of {', '.join(DETECTORS)}")
        for name in v:
            if name not in DETECTORS:
                raise _choice_error("detector", name, DETECTORS)
        return v

    @model_validator(mode="after")
    def _one_check(self) -> Validator:
        kinds = self.kinds_set()
        if len(kinds) != 1:
            what = "none" if not kinds else " and ".join(kinds)
            raise ValueError(
                f"a validator needs exactly one of detect, spending_limit, rows_affected, custom (got {what}); "
                "use one [[validators]] table per check"
            )
        return self

    def kinds_set(self) -> list[str]:
        return [
            k
            for k in ("detect", "spending_limit", "rows_affected", "custom")
            if getattr(self, k) is not None
        ]

    @property
    def kind(self) -> str:
        """Which check this validator runs: ``detect``, ``spending_limit``, ``rows_affected`` or ``custom``."""
        return self.kinds_set()[0]

    @property
    def effective_action(self) -> str:
        """The action a violation takes: the check's own, else the validator's, else ``deny``."""
        inner = self.spending_limit or self.rows_affected
        if inner is not None and inner.action is not None:
            return inner.action
        return self.action or "deny"

    def applies_to_tool(self, tool: str) -> bool:
        return "tool:*" in self.on or f"tool:{tool}" in self.on

    @property
    def applies_to_output(self) -> bool:
        return "output" in self.on


class WasiSpec(_Model):
    """``[wasi]``: the WASI preview1 functions the module may import (none by default)."""

    allow: tuple[StrictStr, ...] = ()

    @field_validator("allow")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name not in WASI_PREVIEW1:
                raise _choice_error("WASI function", name, WASI_PREVIEW1)
        return v


_MCP_TOOL = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$")
ROOT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A root's name in the operator config (``[roots] NAME = DIR``), which a policy's roots start with."""


def check_mcp_url(v: str) -> str:
    """An MCP server's URL: ``http(s)://`` with a host, and no credentials in it."""
    from urllib.parse import urlsplit

    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url {v!r} is not an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("url must not carry credentials; use headers with a {credential} placeholder")
    return v


def check_headers(v: dict[str, str]) -> dict[str, str]:
    """HTTP header names and values that cannot split a request."""
    for k, val in v.items():
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", k):
            raise ValueError(f"{k!r} is not an HTTP header name")
        if any(c in val for c in "\r\n\x00"):
            raise ValueError(f"header {k}: value contains a line break or NUL byte")
    return v


def check_env(v: dict[str, str]) -> dict[str, str]:
    """Environment variable names a process can be given, and values without NUL."""
    for k, val in v.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ValueError(f"{k!r} is not an environment variable name")
        if "\x00" in val:
            raise ValueError(f"env {k}: value contains a NUL byte")
    return v


def split_root(root: str) -> tuple[str, str] | None:
    """A policy's root ``NAME`` or ``NAME/relative/path`` as ``(NAME, relative/path)``; None
    for a ``file://`` URI (the deprecated, machine-specific form)."""
    if root.startswith("file://"):
        return None
    name, _, rest = root.partition("/")
    return name, rest.strip("/")


def _check_root(root: str) -> str:
    parts = split_root(root)
    if parts is None:
        return root
    name, rest = parts
    if not ROOT_NAME.match(name):
        raise ValueError(f"root {root!r}: name a root of the operator config (letters, digits, '_', '-'), "
                         "optionally followed by a relative path: 'data' or 'data/reports'")
    segments = rest.split("/") if rest else []
    if any(s in ("", ".", "..") for s in segments) or "\\" in rest or "\x00" in rest:
        raise ValueError(f"root {root!r}: the path under {name!r} must stay inside it (no '..', '.', '//' or '\\')")
    return root


class ServerStart(_Model):
    """How to start (``command``, ``args``, ``env``, ``cwd``) or reach (``url``, ``headers``) an
    MCP server, each field checked: the operator config's ``[mcp.servers.NAME]``
    (:mod:`host.tools.mcp_config`) and a policy's deprecated ``[mcp.NAME]`` share it."""

    command: StrictStr | None = None
    args: tuple[StrictStr, ...] = ()
    env: dict[str, StrictStr] = Field(default_factory=dict)
    cwd: StrictStr | None = None
    url: StrictStr | None = None
    headers: dict[str, StrictStr] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _command(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("command must not be empty")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return v if v is None else check_mcp_url(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        return check_headers(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)


class McpServer(ServerStart):
    """``[mcp.NAME]``: an MCP server whose tools the agent may call, and what it needs of it.

    How to start or reach the server is the operator's (the ``[mcp.servers.NAME]`` of
    ``torpor.toml``, :mod:`host.tools.mcp_config`); the policy grants its tools
    (``mcp.NAME.TOOL``, each with a grant table ``[tools."mcp.NAME.TOOL"]`` for rates,
    approval and argument rules), names the credentials it may use and the roots it is
    told, relative to roots the operator names.  ``command``/``args``/``env``/``cwd`` or
    ``url``/``headers`` here are the deprecated, machine-specific form (:attr:`self_started`).
    """

    tools: tuple[StrictStr, ...] = ()
    credentials: tuple[StrictStr, ...] = ()
    timeout: Duration | None = None
    hard_timeout: Duration | None = None
    startup_timeout: Duration | None = None
    sampling: StrictStr | None = None
    roots: tuple[StrictStr, ...] = ()
    trust_annotations: StrictBool = False
    elicitation: StrictBool = False

    @property
    def self_started(self) -> bool:
        """The policy says itself how to start (``command``) or reach (``url``) the server:
        the deprecated form, used only where the operator config does not name it."""
        return self.command is not None or self.url is not None

    @field_validator("roots")
    @classmethod
    def _roots(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_root(r) for r in v)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if self.command is not None and self.url is not None:
            raise ValueError("give at most one of command (a stdio server) and url (a streamable-HTTP server); "
                             "better, neither: the operator config says how to start or reach a server")
        if self.command is None and (self.args or self.env or self.cwd is not None):
            raise ValueError("args, env and cwd start a process: they go with command, in the operator config "
                             "([mcp.servers.NAME] of torpor.toml), not in the policy")
        if self.url is None and self.headers:
            raise ValueError("headers are sent to a url server: they go with url, in the operator config "
                             "([mcp.servers.NAME] of torpor.toml), not in the policy")
        return self

    @field_validator("tools")
    @classmethod
    def _tool_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _MCP_TOOL.match(name):
                raise ValueError(f"{name!r} is not an MCP tool name this host can grant (letters, digits, '_', '-', '.')")
        return tuple(dict.fromkeys(v))

    @field_validator("credentials")
    @classmethod
    def _credential_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _CREDENTIAL.match(name):
                raise ValueError(f"{name!r} is not a credential name")
        return v


def _expand_mcp(data: Any) -> Any:
    """``[mcp.S] tools = ["t"]`` grants ``mcp.S.t``; the server's credentials go to each of its grants."""
    if not isinstance(data, Mapping) or not isinstance(data.get("mcp"), Mapping):
        return data
    tools = dict(data["tools"]) if isinstance(data.get("tools"), Mapping) else {}
    for server, spec in data["mcp"].items():
        if not isinstance(spec, Mapping):
            continue
        names = spec.get("tools", ())
        for t in names if isinstance(names, list | tuple) else ():
            if isinstance(t, str):
                tools.setdefault(f"{MCP_PREFIX}{server}.{t}", {})
        creds = spec.get("credentials", ())
        if isinstance(creds, list | tuple) and creds:
            for name, grant in list(tools.items()):
                parts = mcp_tool_parts(str(name))
                if parts and parts[0] == server and isinstance(grant, Mapping) and "handler" not in grant:
                    own = grant.get("credentials", ())
                    own = list(own) if isinstance(own, list | tuple) else []
                    tools[name] = {**grant, "credentials": list(dict.fromkeys([*own, *creds]))}
    return {**data, "tools": tools}


# --- the policy -----------------------------------------------------------------------


class Policy(_Model):
    """A loaded, checked policy.  Immutable; build it with :func:`parse_policy` or :func:`load_policy`."""

    agent: AgentSpec
    budgets: Budgets = Field(default_factory=Budgets)
    retention: Retention = Field(default_factory=Retention)
    tools: dict[str, ToolGrant] = Field(default_factory=dict)
    validators: tuple[Validator, ...] = ()
    wasi: WasiSpec = Field(default_factory=WasiSpec)
    mcp: dict[str, McpServer] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _builtin_defaults(cls, data: Any) -> Any:
        """Fill each builtin's declared ``idempotent`` so the grant says what the host will do."""
        data = _expand_mcp(data)
        if not isinstance(data, Mapping) or not isinstance(data.get("tools"), Mapping):
            return data
        tools = dict(data["tools"])
        for name, grant in tools.items():
            if not isinstance(grant, Mapping) or "idempotent" in grant:
                continue
            kind = tool_kind(str(name), grant.get("handler") is not None)
            if kind is not None and kind in BUILTIN_TOOLS:
                tools[name] = {**grant, "idempotent": default_idempotent(kind, grant)}
        return {**data, "tools": tools}

    @model_validator(mode="after")
    def _cross_checks(self) -> Policy:
        issues = _semantic_issues(self.model_dump())
        if issues:
            raise PolicyError(issues)
        return self

    # Helpers the host calls.

    @property
    def grants(self) -> Mapping[str, ToolGrant]:
        """Tool name → grant, for every tool the agent may call."""
        return self.tools

    @property
    def wasi_allow(self) -> frozenset[str]:
        """The WASI preview1 function names the linker may define."""
        return frozenset(self.wasi.allow)

    @cached_property
    def tool_validators(self) -> Mapping[str, tuple[tuple[int, Validator], ...]]:
        """Tool name → ``(index, validator)`` for the validators on that tool's arguments."""
        return {
            name: tuple((i, v) for i, v in enumerate(self.validators) if v.applies_to_tool(name))
            for name in self.tools
        }

    @cached_property
    def output_validators(self) -> tuple[tuple[int, Validator], ...]:
        """``(index, validator)`` for the validators on the final output."""
        return tuple((i, v) for i, v in enumerate(self.validators) if v.applies_to_output)

    @property
    def custom_validator_refs(self) -> tuple[str, ...]:
        """Every ``custom = "module:function"`` the host must import and pass to the engine."""
        return tuple(dict.fromkeys(v.custom for v in self.validators if v.custom is not None))

    @property
    def handler_refs(self) -> Mapping[str, str]:
        """Tool name → ``module:function`` for every user tool."""
        return {n: g.handler for n, g in self.tools.items() if g.handler is not None}

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain JSON, with units resolved (bytes, seconds) — for display and digests."""
        data: dict[str, Any] = self.model_dump(mode="json")
        return data

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the resolved policy: equal meaning, equal digest ("30s" == "30000ms")."""
        canonical = json.dumps(
            self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def summary(self) -> str:
        """A few readable lines for ``torpor policy check``."""
        lines = [
            f"agent {self.agent.name}" + (f" ({self.agent.version})" if self.agent.version else "")
        ]
        if self.agent.description:
            lines.append(f"  {self.agent.description}")
        lines.append(f"  pool {self.agent.pool}, priority {self.agent.priority}")
        b = self.budgets
        parts = []
        for name in ("fuel", "fuel_total", "tool_calls", "tokens", "max_denials"):
            v = getattr(b, name)
            if v is not None:
                parts.append(f"{name}={v:,}")
        if b.memory is not None:
            parts.append(f"memory={b.memory:,}B")
        for name in ("wall_clock", "wall_clock_total", "stall_timeout"):
            v = getattr(b, name)
            if v is not None:
                parts.append(f"{name}={format_duration(v)}")
        lines.append("budgets: " + (", ".join(parts) if parts else "none (unlimited)"))
        if b.token_warnings:
            lines.append("  token warnings at " + ", ".join(f"{x:.0%}" for x in b.token_warnings))
        lines.append(f"tools ({len(self.tools)}):")
        for name, g in self.tools.items():
            kind = tool_kind(name, g.handler is not None)
            if g.handler is not None:
                bits = [f"handler {g.handler}"]
            elif kind == "mcp":
                bits = ["MCP server " + (mcp_tool_parts(name) or ("?", ""))[0]]
            else:
                bits = ["builtin" if kind == name else f"builtin {kind}"]
            if g.model:
                bits.append(f"model {g.model} at {g.base_url}")
            if g.hosts:
                bits.append("hosts " + ", ".join(g.hosts) + " (" + ", ".join(g.methods or ("GET",)) + ")")
            if g.allow_private:
                nets = g.allow_private if isinstance(g.allow_private, tuple) else ("all",)
                bits.append("private addresses " + ", ".join(nets))
            if g.namespaces:
                bits.append("namespaces " + ", ".join(g.namespaces))
            bits.append("idempotent" if g.idempotent else "not idempotent")
            if g.rate:
                bits.append("rate " + ", ".join(r.text for r in g.rate))
            if g.max_calls is not None:
                bits.append(f"max {g.max_calls} calls")
            if g.args:
                bits.append(f"{len(g.args)} argument rule(s)")
            if g.approval is not None:
                bits.append(
                    "approval " + (f"when {g.approval.when}" if g.approval.when else "always")
                )
            if g.credentials:
                bits.append("credentials " + ", ".join(g.credentials))
            lines.append(f"  {name}: " + "; ".join(bits))
        if self.mcp:
            lines.append(f"mcp servers ({len(self.mcp)}):")
            for sname, srv in self.mcp.items():
                how = srv.url or " ".join((srv.command or "", *srv.args)) or "as the operator config says"
                lines.append(f"  {sname}: {how}")
        lines.append(f"validators ({len(self.validators)}):")
        for i, v in enumerate(self.validators):
            lines.append(f"  [{i}] {v.kind} on {', '.join(v.on)} -> {v.effective_action}")
        lines.append("wasi: " + (", ".join(self.wasi.allow) if self.wasi.allow else "none"))
        lines.append(f"digest {self.digest}")
        return "\n".join(lines)


def _in_use(value: object) -> bool:
    return not (value is None or value is False or (isinstance(value, list | tuple | dict) and not value))


def _settings_issues(
    name: str, kind: str | None, grant: Mapping[str, Any], servers: Mapping[str, Any]
) -> list[PolicyIssue]:
    """Tool-specific settings: on the right tool, complete, and consistent with ``credentials``."""
    issues: list[PolicyIssue] = []
    where = locator("tools", name)
    allowed = TOOL_SETTINGS.get(kind or "", frozenset())
    for key in sorted(_ALL_SETTINGS):
        if key in grant and _in_use(grant[key]) and key not in allowed:
            users = [k if k != "mcp" else "mcp.SERVER.TOOL" for k, v in TOOL_SETTINGS.items() if key in v]
            what = "a user tool" if kind is None else name
            issues.append(
                PolicyIssue(
                    f"{where}.{key}: `{key}` configures {', '.join(users)}; {what} does not use it",
                    f"{where}.{key}",
                )
            )
    if grant.get("on_limit") == "wait" and not _in_use(grant.get("rate")):
        issues.append(PolicyIssue(f'{where}.on_limit: "wait" holds a call over a rate, and {name} has none '
                                  '(add rate = "N/s", or remove on_limit)', f"{where}.on_limit"))
    if _in_use(grant.get("max_wait")) and grant.get("on_limit") != "wait":
        issues.append(PolicyIssue(f'{where}.max_wait: it bounds on_limit = "wait", which {name} does not set',
                                  f"{where}.max_wait"))
    creds = grant.get("credentials", ())
    creds = set(creds) if isinstance(creds, list | tuple) else set()
    if kind == "llm.chat":
        for key, example in (("base_url", '"https://api.openai.com/v1"'), ("model", '"gpt-4o-mini"')):
            if not _in_use(grant.get(key)):
                issues.append(PolicyIssue(f"{where}: {name} needs {key} (e.g. {key} = {example})", f"{where}.{key}"))
        key_name = grant.get("api_key")
        if isinstance(key_name, str) and key_name not in creds:
            issues.append(
                PolicyIssue(
                    f"{where}.api_key: {key_name!r} must also be listed in credentials (the host leases it per call)",
                    f"{where}.api_key",
                )
            )
    if kind == "http.fetch":
        if not _in_use(grant.get("hosts")):
            issues.append(
                PolicyIssue(
                    f'{where}: {name} needs hosts = [...], the hosts it may reach (e.g. ["api.example.com"])',
                    f"{where}.hosts",
                )
            )
        headers = grant.get("headers")
        for h, v in (headers.items() if isinstance(headers, Mapping) else ()):
            for ph in placeholders(v) if isinstance(v, str) else ():
                if ph not in creds:
                    issues.append(
                        PolicyIssue(
                            f"{where}.headers.{h}: {{{ph}}} names no credential of this grant; add {ph!r} to credentials",
                            f"{where}.headers",
                        )
                    )
    if kind == "mcp":
        parts = mcp_tool_parts(name)
        assert parts is not None
        server, tool = parts
        spec = servers.get(server)
        if not isinstance(spec, Mapping):
            guess = _suggest(server, [str(k) for k in servers])
            hint = f" — did you mean 'mcp.{guess}.{tool}'?" if guess else f" (add [mcp.{server}] with tools = [{tool!r}])"
            issues.append(PolicyIssue(f"{where}: there is no MCP server [mcp.{server}]{hint}", where))
        else:
            listed = spec.get("tools", ())
            if isinstance(listed, list | tuple) and listed and tool not in listed:
                guess = _suggest(tool, [str(t) for t in listed])
                hint = f" — did you mean {guess!r}?" if guess else ""
                issues.append(
                    PolicyIssue(
                        f"{where}: [mcp.{server}].tools does not list {tool!r}{hint}",
                        where,
                    )
                )
    return issues


def _mcp_issues(servers: Mapping[str, Any], tools: Mapping[str, Any]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    for server, spec in servers.items():
        where = locator("mcp", str(server))
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", str(server)):
            issues.append(
                PolicyIssue(f"[{where}]: {server!r} is not a server name; use letters, digits, '_' and '-'", where)
            )
        if not isinstance(spec, Mapping):
            continue
        creds = spec.get("credentials", ())
        creds = set(creds) if isinstance(creds, list | tuple) else set()
        for section in ("env", "headers"):
            table = spec.get(section)
            for k, v in (table.items() if isinstance(table, Mapping) else ()):
                for ph in placeholders(v) if isinstance(v, str) else ():
                    if ph not in creds:
                        issues.append(
                            PolicyIssue(
                                f"{where}.{section}.{k}: {{{ph}}} names no credential of this server; "
                                f"add {ph!r} to credentials",
                                f"{where}.{section}",
                            )
                        )
        sampling = spec.get("sampling")
        if isinstance(sampling, str) and (tool_kind(sampling) != "llm.chat" or sampling not in tools):
            issues.append(
                PolicyIssue(
                    f"{where}.sampling: {sampling!r} is not an llm.* tool this policy grants "
                    "(sampling requests are answered by a granted llm tool)",
                    f"{where}.sampling",
                )
            )
    return issues


def _semantic_issues(data: Mapping[str, Any]) -> list[PolicyIssue]:
    """Checks that need more than one section: grants vs builtins, validator targets vs grants.

    They run over the raw tables (defensively typed) so that they can be
    reported together with schema errors, not one run later.
    """
    issues: list[PolicyIssue] = []
    builtin_names = tuple(BUILTIN_TOOLS)
    data = _expand_mcp(data)
    tools = data.get("tools")
    tools = tools if isinstance(tools, Mapping) else {}
    servers = data.get("mcp")
    servers = servers if isinstance(servers, Mapping) else {}
    for name, grant in tools.items():
        where = locator("tools", str(name))
        if not isinstance(grant, Mapping):
            continue
        if not _TOOL_NAME.match(str(name)):
            issues.append(
                PolicyIssue(
                    f"{where}: {name!r} is not a valid tool name; use letters, digits, '_', '-' and dots, e.g. 'erp.create_po'",
                    where,
                )
            )
            continue
        builtin = BUILTIN_TOOLS.get(name)
        if builtin is not None:
            if grant.get("handler") is not None:
                issues.append(
                    PolicyIssue(
                        f"{where}.handler: {name} is a builtin tool; remove `handler` (or grant a tool with another name)",
                        f"{where}.handler",
                    )
                )
            if grant.get("idempotent") is True and not builtin.idempotent:
                issues.append(
                    PolicyIssue(
                        f"{where}.idempotent: {name} is not idempotent; a policy may only tighten a builtin "
                        "(set idempotent = false or remove it)",
                        f"{where}.idempotent",
                    )
                )
        kind = tool_kind(str(name), grant.get("handler") is not None)
        issues += _settings_issues(str(name), kind, grant, servers)
        if builtin is not None or kind is not None:
            pass
        elif grant.get("handler") is None:
            guess = _suggest(str(name), builtin_names)
            need = 'a user tool needs handler = "module:function"'
            hint = f" — did you mean {guess!r}? Otherwise {need}" if guess else f"; {need}"
            issues.append(
                PolicyIssue(
                    f"{where}: {name!r} is not a builtin tool ({', '.join(builtin_names)}){hint}",
                    where,
                    guess,
                )
            )
    issues += _mcp_issues(servers, tools)
    granted = tuple(str(n) for n in tools)
    validators = data.get("validators")
    for i, v in enumerate(validators if isinstance(validators, list | tuple) else ()):
        targets = v.get("on") if isinstance(v, Mapping) else None
        for t in targets if isinstance(targets, list | tuple) else ():
            if (
                isinstance(t, str)
                and t.startswith("tool:")
                and t != "tool:*"
                and len(t) > 5
                and t[5:] not in tools
            ):
                guess = _suggest(t[5:], granted)
                hint = (
                    f" — did you mean 'tool:{guess}'?"
                    if guess
                    else " (grant it in [tools] or fix the name)"
                )
                issues.append(
                    PolicyIssue(
                        f"validators[{i}].on: {t!r} names a tool this policy does not grant{hint}",
                        f"validators[{i}].on",
                        f"tool:{guess}" if guess else None,
                    )
                )
    budgets = data.get("budgets")
    if (
        isinstance(budgets, Mapping)
        and budgets.get("token_warnings")
        and budgets.get("tokens") is None
    ):
        issues.append(
            PolicyIssue(
                "budgets.token_warnings: warnings need a token budget; set budgets.tokens",
                "budgets.token_warnings",
            )
        )
    return issues


# --- loading ----------------------------------------------------------------------------


def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; raises :class:`PolicyError` naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([PolicyIssue("file not found", source=str(p))]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(
            [PolicyIssue(f"not UTF-8 text ({exc.reason} at byte {exc.start})", source=str(p))]
        ) from None
    except OSError as exc:
        raise PolicyError(
            [PolicyIssue(f"cannot read: {exc.strerror or exc}", source=str(p))]
        ) from None
    return parse_policy(text, source=str(p))


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and check policy TOML; every problem is reported in one :class:`PolicyError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([PolicyIssue(f"not valid TOML: {exc}", source=source)]) from None
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise PolicyError([PolicyIssue(f"not a policy: values nest deeper than {MAX_NESTING} levels",
                                       source=source)]) from None
    return policy_from_dict(data, source=source)


#: How deep tables and arrays of a policy may nest (real policies nest four or five levels);
#: deeper, and the recursive walks of validation and of the engine are refused up front.
MAX_NESTING = 32


def _check_nesting(data: Any, source: str) -> None:
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping | list | tuple):
            if depth > MAX_NESTING:
                raise PolicyError([PolicyIssue(f"not a policy: values nest deeper than {MAX_NESTING} levels",
                                               source=source)])
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, Mapping) else value))


def policy_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Policy:
    """Check an already-parsed policy table (e.g. from JSON or a test)."""
    _check_nesting(data, source)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        pairs = _drop_consequences([(e, _issue_from(e, source)) for e in errors])
        # Unknown keys first: a typo is the likeliest root cause of what follows.
        pairs.sort(key=lambda p: 0 if p[0]["type"] == "extra_forbidden" else 1)
        issues = [i for _, i in pairs]
        seen = {i.field for i in issues}
        issues += [i for i in _semantic_issues(data) if i.field not in seen]
        raise PolicyError(issues, source=source) from None
    except PolicyError as exc:
        raise exc.with_source(source) from None


def _drop_consequences(pairs: list[tuple[Any, PolicyIssue]]) -> list[tuple[Any, PolicyIssue]]:
    """Hide "X is missing" when an unknown key next to it is a misspelling of X."""
    meant = {
        (tuple(e["loc"][:-1]), i.suggestion)
        for e, i in pairs
        if e["type"] == "extra_forbidden" and i.suggestion
    }
    return [
        (e, i)
        for e, i in pairs
        if not (e["type"] == "missing" and (tuple(e["loc"][:-1]), str(e["loc"][-1])) in meant)
    ]


# --- turning pydantic's errors into ones a person can act on ---------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "int_parsing": "an integer",
    "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)",
    "float_type": "a number",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "tuple_type": "an array",
    "list_type": "an array",
}


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin is Union or type(tp).__name__ == "UnionType":
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _keys_at(loc: tuple[int | str, ...]) -> list[str] | None:
    """The valid keys of the table at ``loc``, found by walking the schema."""
    tp: Any = Policy
    for el in loc:
        tp = _unwrap(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(str(el))
            if field is None:
                return None
            tp = field.annotation
        elif origin in (dict, Mapping):
            tp = get_args(tp)[1]
        elif origin in (tuple, list):
            tp = get_args(tp)[0]
        else:
            return None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return None


def _issue_from(err: Any, source: str) -> PolicyIssue:
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind: str = err["type"]
    field = locator(*loc) if loc else None
    ctx: dict[str, Any] = err.get("ctx") or {}
    value = err.get("input")

    if kind == "extra_forbidden":
        key = str(loc[-1])
        parent = loc[:-1]
        valid = _keys_at(parent) or []
        suggestion = _suggest(key, valid)
        where = f"[{locator(*parent)}] unknown key" if parent else "unknown top-level key"
        if (
            len(parent) >= 3
            and parent[0] == "tools"
            and parent[-2] == "args"
            and isinstance(value, Mapping)
        ):
            path = f"{parent[-1]}.{key}"
            quoted = locator("tools", str(parent[1]), "args") + f'."{path}"'
            return PolicyIssue(
                f"{where} {key!r} — a nested argument path must be quoted as one key: [{quoted}]",
                field,
                path,
                source,
            )
        if suggestion:
            message = f"{where} {key!r} — did you mean {suggestion!r}?"
        else:
            message = (
                f"{where} {key!r}; valid keys: {', '.join(valid)}" if valid else f"{where} {key!r}"
            )
        return PolicyIssue(message, field, suggestion, source)

    if kind == "missing":
        if len(loc) == 1:
            return PolicyIssue(
                f'[{field}] table is missing; every policy needs it (e.g. [agent] with name = "my-agent")',
                field,
                None,
                source,
            )
        return PolicyIssue(f"{field} is required", field, None, source)

    if kind in _EXPECTED:
        return PolicyIssue(
            f"{field}: expected {_EXPECTED[kind]}, got {type_name(value)}", field, None, source
        )

    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        suggestion = _suggest(str(value), choices) if isinstance(value, str) else None
        hint = f" — did you mean {suggestion!r}?" if suggestion else ""
        return PolicyIssue(
            f"{field}: {value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}",
            field,
            suggestion,
            source,
        )

    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        rel = {
            "greater_than": ("gt", "greater than"),
            "greater_than_equal": ("ge", "at least"),
            "less_than": ("lt", "less than"),
            "less_than_equal": ("le", "at most"),
        }[kind]
        return PolicyIssue(
            f"{field}: must be {rel[1]} {ctx.get(rel[0])} (got {value!r})", field, None, source
        )

    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return PolicyIssue(f"{field}: {msg}", field, None, source)

    suggestion = ctx.get("suggestion") or None
    return PolicyIssue(f"{field}: {err['msg']}", field, suggestion, source)
