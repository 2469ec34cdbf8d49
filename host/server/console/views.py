"""What the console's pages show, as plain data: an agent's timeline, the agents' counts, the
geometry of the small SVG charts. No HTML here: the templates render it, escaping every
string (what an agent wrote, its tool arguments and answers, names and reasons are untrusted
text), so nothing in this module has to be trusted to escape.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from host.sandbox import guest_json
from host.server.agents import MOVING

#: How much of an argument or an answer a page shows (the rest is cut, and says so).
SHOW_CHARS = 4000
#: The timeline chart's size (SVG user units) and its left margin for the row names.
CHART_W, ROW_H, LABEL_W = 900, 22, 150


def shown(value: Any, limit: int = SHOW_CHARS) -> str:
    """A value as indented JSON text, cut at ``limit`` characters (escaped by the template)."""
    if isinstance(value, str):
        # A JSON answer shown indented; other text as it is. The text is the agent's: parsed
        # within the host's bounds (50,000 brackets were a RecursionError and a 500 page).
        with contextlib.suppress(ValueError):  # not JSON, or beyond the bounds (PoisonValue)
            value = guest_json.parse(value)
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + f"\n… ({len(text) - limit:,} more characters)"


def duration(seconds: float | None) -> str:
    """``412 µs``, ``3.2 ms``, ``1.50 s``, ``4 min 2 s``, ``3 h 10 min``."""
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


@dataclass
class Call:
    """One tool call as the timeline shows it: the audit's events joined with the journal's
    arguments and answer."""

    seq: int
    tool: str
    requested: float | None = None
    answered: float | None = None
    decision: str | None = None  # allow, deny, approval, terminate, defer
    rule: str | None = None
    code: str | None = None
    reason: str | None = None
    status: int | None = None
    args: str | None = None
    response: str | None = None
    fuel: int | None = None  # the agent's fuel burnt when it made this call (the journal's)
    fuel_step: int | None = None  # burnt since its previous call: what the guest spent getting here
    tokens: int | None = None
    model: str | None = None
    waited: tuple[float, float | None] | None = None  # an approval's wait: from the request to the decision
    decided_by: str | None = None

    @property
    def outcome(self) -> str:
        if self.decision in ("deny", "terminate"):
            return "denied"
        if self.decision == "approval" and self.answered is None:
            return "waiting"
        if self.answered is None:
            return "running"
        return "ok" if self.status == 0 else "error"

    @property
    def took(self) -> float | None:
        if self.requested is None or self.answered is None:
            return None
        return self.answered - self.requested


@dataclass
class Item:
    """One row of the timeline's table."""

    t: float
    kind: str
    text: str
    css: str = ""
    call: Call | None = None


@dataclass
class Timeline:
    start: float
    end: float
    items: list[Item] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    checkpoints: list[tuple[float, int, int]] = field(default_factory=list)  # (t, seq, bytes)
    resumes: list[float] = field(default_factory=list)
    ended: tuple[float, str] | None = None

    def chart(self) -> dict[str, Any]:
        """The timeline chart's geometry: one row per tool (first used first), one for the
        agent's lifecycle (checkpoints, resumes, its end), one for approval waits."""
        span = max(self.end - self.start, 1e-6)
        inner = CHART_W - LABEL_W - 10

        def x(t: float) -> float:
            return round(LABEL_W + (min(max(t, self.start), self.end) - self.start) / span * inner, 2)

        tools: list[str] = []
        for c in self.calls:
            if c.tool not in tools:
                tools.append(c.tool)
        rows = ["lifecycle", *tools, "approvals"]
        row_of = {name: i for i, name in enumerate(rows)}
        bars, marks = [], []
        for c in self.calls:
            if c.requested is None:
                continue
            end = c.answered if c.answered is not None else (c.waited[0] if c.waited else self.end)
            x0, x1 = x(c.requested), x(end)
            bars.append({"x": x0, "y": row_of[c.tool] * ROW_H + 4, "w": max(3.0, round(x1 - x0, 2)),
                         "h": ROW_H - 8, "css": c.outcome, "title": f"#{c.seq} {c.tool}: {c.outcome}, "
                                                                    f"{duration(c.took)}"})
            if c.waited is not None:
                w0, w1 = x(c.waited[0]), x(c.waited[1] if c.waited[1] is not None else self.end)
                bars.append({"x": w0, "y": row_of["approvals"] * ROW_H + 4, "w": max(3.0, round(w1 - w0, 2)),
                             "h": ROW_H - 8, "css": "approval",
                             "title": f"#{c.seq} {c.tool} waited for a person"
                                      + (f", decided by {c.decided_by}" if c.decided_by else "")})
        for t, seq, size in self.checkpoints:
            marks.append({"x": x(t), "y": 3, "h": ROW_H - 6, "css": "checkpoint",
                          "title": f"checkpoint {seq} ({size:,} bytes)"})
        for t in self.resumes:
            marks.append({"x": x(t), "y": 1, "h": ROW_H - 2, "css": "resume", "title": "resumed"})
        if self.ended is not None:
            marks.append({"x": x(self.ended[0]), "y": 0, "h": ROW_H, "css": "end", "title": self.ended[1]})
        ticks = [{"x": round(LABEL_W + inner * i / 4, 2), "label": "+" + duration(span * i / 4),
                  "anchor": "end" if i == 4 else "start"} for i in range(5)]
        return {"width": CHART_W, "height": len(rows) * ROW_H + 24, "rows": [
            {"name": name, "y": i * ROW_H, "ty": i * ROW_H + ROW_H * 0.7} for i, name in enumerate(rows)],
            "bars": bars, "marks": marks, "ticks": ticks, "axis_y": len(rows) * ROW_H + 16, "label_w": LABEL_W}


def timeline(record: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
             journal: Mapping[int, Mapping[str, Any]], now: float) -> Timeline:
    """An agent's timeline from its record, its audit records (in order) and its journal."""
    start = float(record.get("created_at") or (records[0].get("t") if records else now) or now)
    finished = record.get("finished_at")
    last = max([float(r.get("t") or start) for r in records] or [start])
    end = float(finished) if isinstance(finished, int | float) else (
        now if record.get("status") in MOVING or record.get("status") == "waiting_approval" else last)
    tl = Timeline(start=start, end=max(end, last, start + 1e-6))
    calls: dict[int, Call] = {}

    def call(r: Mapping[str, Any]) -> Call:
        seq = int(r.get("call_seq") or 0)
        c = calls.get(seq)
        if c is None:
            c = calls[seq] = Call(seq=seq, tool=str(r.get("tool") or "?"))
            tl.calls.append(c)
            e = journal.get(seq)
            if e is not None:
                c.args = shown(e.get("args"))
                if "response" in e:
                    c.response = shown(e.get("response"))
                c.fuel = int(e["fuel"]) if isinstance(e.get("fuel"), int) else None
        return c

    waiting: Call | None = None
    for r in records:
        kind, t = str(r.get("kind")), float(r.get("t") or start)
        if kind == "tool.requested":
            c = call(r)
            c.requested = t
            tl.items.append(Item(t, kind, f"#{c.seq} {c.tool} called", "call", c))
        elif kind in ("tool.allowed", "tool.denied", "tool.approval_requested", "tool.terminated", "tool.deferred"):
            c = call(r)
            d = r.get("decision") if isinstance(r.get("decision"), dict) else {}
            assert isinstance(d, dict)
            c.decision = str(d.get("decision") or kind.split(".")[1])
            c.rule = d.get("rule") if isinstance(d.get("rule"), str) else None
            c.code = d.get("code") if isinstance(d.get("code"), str) else None
            c.reason = d.get("reason") if isinstance(d.get("reason"), str) else None
            if kind == "tool.denied":
                tl.items.append(Item(t, kind, f"#{c.seq} {c.tool} denied", "denied", c))
            elif kind == "tool.approval_requested":
                c.waited = (t, None)
                waiting = c
                tl.items.append(Item(t, kind, f"#{c.seq} {c.tool} waits for a person", "approval", c))
            elif kind == "tool.terminated":
                tl.items.append(Item(t, kind, f"#{c.seq} {c.tool}: the policy ended the agent", "denied", c))
        elif kind in ("approval.granted", "approval.denied"):
            verb = "approved" if kind == "approval.granted" else "denied"
            note = r.get("note") if kind == "approval.granted" else r.get("reason")
            text = f"{verb} by {r.get('by') or 'someone'}" + (f": {note}" if note else "")
            if waiting is not None:
                waiting.waited = (waiting.waited[0] if waiting.waited else t, t)
                waiting.decided_by = str(r.get("by") or "")
            tl.items.append(Item(t, kind, text, "approval", waiting))
            waiting = None
        elif kind == "tool.answered":
            c = call(r)
            c.answered, c.status = t, int(r.get("status") or 0)
            tl.items.append(Item(t, kind, f"#{c.seq} {c.tool} answered ({'ok' if c.status == 0 else 'error'})",
                                 "ok" if c.status == 0 else "error", c))
        elif kind == "tokens.used":
            c = call(r)
            c.tokens = (c.tokens or 0) + int(r.get("tokens") or 0)
            c.model = r.get("model") if isinstance(r.get("model"), str) else c.model
            tl.items.append(Item(t, kind, f"#{c.seq} {c.tool}: {r.get('tokens')} tokens"
                                 + (f" ({c.model})" if c.model else ""), "tokens", c))
        elif kind == "checkpoint":
            seq, size = int(r.get("checkpoint") or 0), int(r.get("size") or 0)
            tl.checkpoints.append((t, seq, size))
            tl.items.append(Item(t, kind, f"checkpoint {seq} ({size:,} bytes): hibernation-ready", "checkpoint"))
        elif kind == "agent.resumed":
            tl.resumes.append(t)
            tl.items.append(Item(t, kind, f"resumed from checkpoint {r.get('checkpoint')}", "resume"))
        elif kind == "agent.spawned":
            tl.items.append(Item(t, kind, f"spawned {r.get('name')} (bundle {str(r.get('bundle_digest'))[:12]})",
                                 "lifecycle"))
        elif kind.startswith("agent.") and kind[6:] == record.get("status") and finished is not None:
            tl.ended = (t, kind[6:])
            err = r.get("error") if isinstance(r.get("error"), dict) else None
            text = kind[6:] + (f": {err.get('code')}: {err.get('message')}" if err else "")
            tl.items.append(Item(t, kind, text, "end" if kind == "agent.completed" else "denied"))
        else:
            tl.items.append(Item(t, kind, _describe(r), "other"))
    before = 0
    for c in sorted(tl.calls, key=lambda c: c.seq):
        if c.fuel is not None:
            c.fuel_step, before = max(0, c.fuel - before), c.fuel
    return tl


def _describe(r: Mapping[str, Any]) -> str:
    """A record the timeline has no row of its own for: its kind and its plain fields."""
    skip = {"agent_id", "hash", "prev", "seq", "kind", "t"}
    parts = [f"{k}={v}" for k, v in r.items() if k not in skip and isinstance(v, str | int | float)]
    return f"{r.get('kind')} " + " ".join(parts)[:300]


def counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Agents by status, most first."""
    out: dict[str, int] = {}
    for r in rows:
        s = str(r.get("status"))
        out[s] = out.get(s, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))


def bars(values: Mapping[str, float], *, width: int = 280, bar_h: int = 16) -> dict[str, Any]:
    """A small horizontal bar chart: one bar per label, scaled to the largest."""
    top = max([float(v) for v in values.values()] or [0.0]) or 1.0
    # 110 units of label on the left, room for the value's digits on the right of the longest bar
    items = [{"label": k, "value": v, "y": i * (bar_h + 4), "w": round(max(0.0, float(v)) / top * (width - 170), 2),
              "ty": i * (bar_h + 4) + bar_h * 0.75} for i, (k, v) in enumerate(values.items())]
    return {"width": width, "height": max(1, len(items)) * (bar_h + 4), "bar_h": bar_h, "items": items}
