"""An agent's guest log lines, kept in the store: bounded per agent, written with the step.

A guest's ``torpor_log`` lines used to live only in the memory of whoever drove the agent
(``RunResult.logs``); a server restarted, or a client that came later, had none. Here each
line gets a number (per agent, from 0, never reused) and is written in the commit of the
step that logged it (:func:`flush`, called by :meth:`host.runtime.commits.AgentCommits.agent`):
a crash loses only the lines of the segment after the last commit, and that segment runs
again from the checkpoint on resume and logs them again, so the kept log has each line of
what the agent did once, as its checkpoints have each step once.

Bucket ``logs`` (:data:`BUCKET`):

``<agent id>``                          the head: ``next first lines bytes`` (ASCII integers: it is read
                                        and written at every commit that logged)
``<agent id>/<first>/<lines>/<bytes>``  a batch: the lines one commit wrote, ``[[t, level, message], ...]``
                                        (numbered from ``first``; its size in the key, so a trim
                                        reads no batch)

Bounded: at most :data:`MAX_LINES` lines and :data:`MAX_BYTES` bytes of messages per agent.
Past either, the oldest batches are deleted down to three quarters of the bound (so the
trim is not paid at every commit of a chatty agent); ``first`` says where the kept log
starts. Lines a segment logged beyond the bound before its commit are dropped in memory
(:meth:`Pending.add`) and still take their numbers, so a reader sees the gap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from snapshots.store import LOGS_BUCKET

BUCKET = LOGS_BUCKET
#: Lines kept per agent in the store, at most.
MAX_LINES = 1000
#: Bytes of messages kept per agent in the store, at most.
MAX_BYTES = 256 * 1024
#: What a trim leaves, as a share of each bound.
_TRIM_TO = 0.75
#: One message at most (longer ones are cut, saying so).
MAX_LINE = 16 * 1024
_CUT = " [cut: the line was longer than the stored log keeps]"
#: The most lines one read answers.
PAGE_MAX = 1000


@dataclass
class Pending:
    """The lines an agent logged since its last commit (held by its ``LiveAgent``).

    Holds at most about a stored log's worth: past it, the oldest pending lines go (they
    would be trimmed at the commit anyway) and are counted in ``skipped``."""

    lines: list[list[Any]] = field(default_factory=list)
    bytes: int = 0
    skipped: int = 0

    def add(self, level: str, message: str) -> None:
        if len(message) > MAX_LINE:
            message = message[:MAX_LINE] + _CUT
        self.lines.append([round(time.time(), 6), level, message])
        self.bytes += len(message)
        if len(self.lines) > 2 * MAX_LINES or self.bytes > 2 * MAX_BYTES:  # amortised: cut once per bound
            keep, size = _newest(self.lines, int(MAX_LINES * _TRIM_TO), int(MAX_BYTES * _TRIM_TO))
            self.skipped += len(self.lines) - keep
            self.lines = self.lines[len(self.lines) - keep:]
            self.bytes = size

    def __len__(self) -> int:
        return len(self.lines) + self.skipped

    def take(self, n_lines: int, n_skipped: int) -> None:
        """Forget what a commit wrote (the first ``n_lines`` lines, ``n_skipped`` skipped)."""
        gone = self.lines[:n_lines]
        del self.lines[:n_lines]
        self.bytes -= sum(len(line[2]) for line in gone)
        self.skipped -= n_skipped


def _newest(lines: list[list[Any]], max_lines: int, max_bytes: int) -> tuple[int, int]:
    """How many of the newest ``lines`` fit the bounds, and their bytes."""
    n = size = 0
    for line in reversed(lines):
        if n >= max_lines or size + len(line[2]) > max_bytes:
            break
        n += 1
        size += len(line[2])
    return n, size


_HEAD = ("next", "first", "lines", "bytes")
#: One encoder, made once (``json.dumps`` with its own separators makes one per call).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def _head(txn: Any, agent_id: str) -> dict[str, int]:
    raw = txn.get_blob(BUCKET, agent_id)
    parts = bytes(raw).split() if raw is not None else []
    if len(parts) == len(_HEAD) and all(p.isdigit() for p in parts):
        return dict(zip(_HEAD, map(int, parts), strict=True))
    # None yet (or unreadable): a fresh count, numbered after the batches there are.
    after = _after_batches(txn, agent_id)
    return {"next": after, "first": after, "lines": 0, "bytes": 0}


def _put_head(txn: Any, agent_id: str, head: dict[str, int]) -> None:
    txn.put_blob(BUCKET, agent_id, " ".join(str(head[k]) for k in _HEAD).encode())


def _after_batches(txn: Any, agent_id: str) -> int:
    last = 0
    for key, _ in txn.iter_blobs(BUCKET, f"{agent_id}/"):
        first, lines, _size = _parts(key)
        last = max(last, first + lines)
    return last


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _parts(key: str) -> tuple[int, int, int]:
    """A batch key's (first line number, lines, bytes); zeros for what does not parse."""
    parts = key.split("/")[1:]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return 0, 0, 0
    return int(parts[0]), int(parts[1]), int(parts[2])


def _key(agent_id: str, first: int, lines: int, size: int) -> str:
    return f"{agent_id}/{first:012d}/{lines}/{size}"


def flush(txn: Any, agent_id: str, pending: Pending) -> tuple[int, int]:
    """Write the pending lines as one batch in ``txn`` (the step's commit); what was written
    as ``(lines, skipped)``, for :meth:`Pending.take` once the commit is durable."""
    n_lines, n_skipped = len(pending.lines), pending.skipped
    if not n_lines and not n_skipped:
        return 0, 0
    head = _head(txn, agent_id)
    head["next"] += n_skipped
    lines = pending.lines
    if n_lines:
        size = pending.bytes
        if n_lines > MAX_LINES or size > MAX_BYTES:  # one commit over the bound: its newest lines
            keep, size = _newest(lines, int(MAX_LINES * _TRIM_TO), int(MAX_BYTES * _TRIM_TO))
            head["next"] += n_lines - keep
            lines = lines[n_lines - keep:]
        txn.put_blob(BUCKET, _key(agent_id, head["next"], len(lines), size), _encode(lines).encode())
        head["next"] += len(lines)
        head["lines"] += len(lines)
        head["bytes"] += size
    if head["lines"] > MAX_LINES or head["bytes"] > MAX_BYTES:
        _trim(txn, agent_id, head)
    if head["lines"] == 0:
        head["first"] = head["next"]
    _put_head(txn, agent_id, head)
    return n_lines, n_skipped


def _trim(txn: Any, agent_id: str, head: dict[str, int]) -> None:
    """Delete the oldest batches until the kept log is within three quarters of the bounds
    (the newest batch stays: it is within them, :func:`flush` saw to that)."""
    keys = [key for key, _ in txn.iter_blobs(BUCKET, f"{agent_id}/")]
    max_lines, max_bytes = int(MAX_LINES * _TRIM_TO), int(MAX_BYTES * _TRIM_TO)
    for i, key in enumerate(keys[:-1]):
        if head["lines"] <= max_lines and head["bytes"] <= max_bytes:
            break
        _first, lines, size = _parts(key)
        txn.delete_blob(BUCKET, key)
        head["lines"] -= lines
        head["bytes"] -= size
        head["first"] = _parts(keys[i + 1])[0]
    head["lines"], head["bytes"] = max(0, head["lines"]), max(0, head["bytes"])


def read(store: Any, agent_id: str, *, after: int = -1, limit: int = PAGE_MAX) -> dict[str, Any]:
    """The agent's kept lines numbered above ``after``, at most ``limit`` of them, oldest first:
    ``{"agent_id", "lines": [{"seq", "t", "level", "message"}], "first", "next", "more"}``.

    ``first``: the oldest line still kept (lines before it were trimmed, or never kept);
    ``next``: the number the next line logged will get; ``more``: a page's limit cut the
    answer (read again with ``after`` the last ``seq``)."""
    limit = max(1, min(int(limit), PAGE_MAX))
    out: list[dict[str, Any]] = []
    more = False
    with store.read() as txn:
        raw = txn.get_blob(BUCKET, agent_id)
        head = _head(txn, agent_id) if raw is not None else {"next": 0, "first": 0}
        for key, blob in txn.iter_blobs(BUCKET, f"{agent_id}/"):
            first, count, _size = _parts(key)
            if first + count <= after + 1:
                continue  # wholly before the page: not decoded
            batch = _json(blob)
            if not isinstance(batch, list):
                continue
            for i, line in enumerate(batch):
                seq = first + i
                if seq <= after or not isinstance(line, list) or len(line) != 3:
                    continue
                if len(out) >= limit:
                    more = True
                    break
                out.append({"seq": seq, "t": line[0], "level": line[1], "message": line[2]})
            if more:
                break
    return {"agent_id": agent_id, "lines": out, "first": head["first"], "next": head["next"], "more": more}
