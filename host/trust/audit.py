"""The audit log: every lifecycle event and decision, hash-chained per agent, signed as a whole.

Each record carries the hash of the agent's previous record, and its own hash
over its canonical JSON; altering, removing, inserting or reordering a record
breaks the chain at that point, which the verifiers here name. A record holds the
events of one commit: one event as a record of its kind, several (a tool call's
request, decision, checkpoint and answer) as one ``step`` record, which readers see as
its events (:func:`expand`); chains written one record per event verify and read alike. Records are
appended in the same store transaction as the state change they describe (a
checkpoint, a tool result, a termination), so the log never claims what the
store does not hold, nor misses what it does.

A chain alone cannot tell a rewritten history (every hash recomputed) from the
real one, nor a cut-off tail from an agent that simply did less. Three things
close those gaps:

* **the agent record's head** (``audit_seq``, ``audit_head``), written in the
  same transaction as each append: a log that ends early or runs on is caught;
* **signed heads** (``audit_heads`` bucket): periodically the host signs, with
  its Ed25519 key, the digest of every agent's (seq, hash) head, their total
  count and the time; each head is chained to the previous one and lists the
  agents that changed since it. Rewriting anything a head vouches for needs
  the host's private key;
* **signed checkpoints**: retention pruning deletes a prefix of an agent's
  chain and puts in its place one ``audit.checkpoint`` record, signed, that
  carries the hash of the last pruned record, so what remains still verifies
  from that anchor.

Exports (:func:`export`) are JSON Lines: a header, a manifest line per agent
(its exported seq range and anchor), the records, the signed heads, and a
final seal signing the digest of every line before it. :func:`verify_export`
checks them without the store, naming the first broken record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from host.errors import ConfigError, TorporError
from snapshots import fastjson
from snapshots.errors import StoreError
from snapshots.store import UNREADABLE

GENESIS = "0" * 64
BUCKET = "audit"
HEADS_BUCKET = "audit_heads"
HEAD_PREFIX = "h/"
HEAD_STATE = "state"
CHECKPOINT_KIND = "audit.checkpoint"
#: The kind of a record holding all the events of one commit (``events``: each ``{"kind", ...data}``).
STEP_KIND = "step"
#: The kind of the stand-in for a record that does not decode (see ``_record``).
UNREADABLE_KIND = "(unreadable)"
EXPORT_FORMAT = "torpor-audit-export"
EXPORT_VERSION = 1
DEFAULT_HEAD_INTERVAL_S = 60.0

DOMAIN_HEAD = b"torpor-audit-head-v1\x00"
DOMAIN_CHECKPOINT = b"torpor-audit-checkpoint-v1\x00"
DOMAIN_EXPORT = b"torpor-audit-export-v1\x00"


class AuditError(TorporError):
    """The audit log cannot be read, exported or pruned as asked."""

    code = "audit"




_log = logging.getLogger("torpor.audit")


def canonical(obj: Any) -> bytes:
    """The form every audit hash and digest is taken over: sorted keys, no spaces, UTF-8
    (the standard library's ``json.dumps(..., sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)``, byte for byte, by :func:`snapshots.fastjson.canonical`: chains
    and digests written by earlier versions verify as they did)."""
    return fastjson.canonical(obj)


def _object(raw: bytes) -> dict[str, Any] | None:
    """A stored audit value decoded as the JSON object it must be, or None if it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _record(key: str, raw: bytes) -> dict[str, Any]:
    """An agent's audit record as stored, or a stand-in that no chain check accepts.

    One record that does not decode must not stop a listing or a verification of every
    agent: the stand-in takes its place, and the chain check reports it as modified.
    """
    rec = _object(raw)
    if rec is None:
        agent_id, _, seq = key.partition("/")
        rec = {"agent_id": agent_id, "seq": int(seq) if seq.isdigit() else None, "kind": UNREADABLE_KIND,
               "hash": "", "key": key}
    return rec


def digest(obj: Any) -> str:
    """SHA-256 of a JSON value's canonical form (for arguments and results)."""
    return hashlib.sha256(canonical(obj)).hexdigest()


def record_key(agent_id: str, seq: int) -> str:
    return f"{agent_id}/{seq:012d}"


def answered_digest(txn: Any, agent_id: str, last_seq: int, call_seq: int) -> str | None:
    """The ``result_digest`` the agent's audit holds for the answer to call ``call_seq``, or None.

    Why: a journal answer is sealed with a checksum, which someone who can write the store
    can recompute; the audit chain (hash-linked, its heads signed) is what tells deliberate
    rewriting apart. So a recorded answer about to be replayed into an agent is compared
    with the digest its ``tool.answered`` record holds. The walk goes back from the chain's
    last record and stops at the call's request, at an earlier call, or at a record that is
    not there (pruned): it reads only the records written since the call, a handful.
    """
    for seq in range(last_seq, 0, -1):
        raw = txn.get_blob("audit", record_key(agent_id, seq))
        if raw is None:
            return None
        stored = _object(raw)
        if stored is None:
            return None  # a damaged record: audit verify reports it; no digest to compare with
        for rec in reversed(expand(stored)):
            at = rec.get("call_seq")
            if isinstance(at, int) and not isinstance(at, bool):
                if at < call_seq or (at == call_seq and rec.get("kind") == "tool.requested"):
                    return None
                if at == call_seq and rec.get("kind") == "tool.answered":
                    found = rec.get("result_digest")
                    return found if isinstance(found, str) else None
    return None


def expand(rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The events one stored record holds, each as a record of its own kind: a step record
    (:data:`STEP_KIND`, every event of one commit) as one view per event, with the step's
    ``agent_id``, ``seq``, ``t``, ``prev`` and ``hash``; any other record as itself.

    Why: a chain written before step records (one record per event) and one written after
    read the same through :func:`records`, so what the audit shows (``torpor audit show``,
    the console, the event stream, replay) does not depend on the format; what the chain
    verifies is the stored records, whatever their kind."""
    events = rec.get("events")
    if rec.get("kind") != STEP_KIND or not isinstance(events, list):
        return [rec]
    common = {k: rec.get(k) for k in ("agent_id", "seq", "t", "prev", "hash")}
    first = event_number(rec)
    out: list[dict[str, Any]] = []
    for i, ev in enumerate(events):
        view = {**common, **ev} if isinstance(ev, dict) else {**common, "kind": UNREADABLE_KIND}
        view.update((k, common[k]) for k in ("agent_id", "seq", "prev", "hash"))  # an event never renames its step
        if first is not None:
            view["n"] = first + i
        out.append(view)
    return out


def event_number(rec: Mapping[str, Any]) -> int | None:
    """The number of an event in its agent's chain, counting from 1 (a step's events one by
    one): stable whatever is pruned before it, so a follower of the log can say where it got
    to (the event stream's ``Last-Event-ID``). A record numbered as its seq holds none (every
    record of a chain written one per event); None for a record that does not say."""
    n = rec.get("n", rec.get("seq"))
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _head_key(seq: int) -> str:
    return f"{HEAD_PREFIX}{seq:012d}"


def seal(agent_id: str, seq: int, prev: str, t: float, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """A chained record: ``hash`` covers every other field, ``prev`` links it to the last one."""
    return _sealed(agent_id, seq, prev, t, kind, data)[0]


def _sealed(agent_id: str, seq: int, prev: str, t: float, kind: str,
            data: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """The sealed record and the bytes it is stored as: its canonical body (what ``hash``
    covers) with ``hash`` appended, so a record is encoded once, not twice (readers parse
    it; verification recomputes the hash from the parsed fields, whatever their order)."""
    rec: dict[str, Any] = {"agent_id": agent_id, "seq": seq, "t": t, "kind": kind, "prev": prev, **data}
    body = canonical(rec)
    rec["hash"] = h = hashlib.sha256(body).hexdigest()
    return rec, b"%s,\"hash\":\"%s\"}" % (body[:-1], h.encode())


def append_events(txn: Any, rec: dict[str, Any], events: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Seal ``events`` onto the agent's chain inside ``txn``; updates ``rec``'s chain head.

    The one writer of an agent's chain: the events of one call become its next record,
    linked to the head the agent record holds, and the record's ``audit_seq`` and
    ``audit_head`` move on in the same transaction. One event is a record of its own kind;
    several (a tool call's request, decision, checkpoint and answer, committed together)
    are one :data:`STEP_KIND` record holding them in order: one canonical encoding, one
    SHA-256 and one put a step, not one per event (:func:`expand` reads them back apart).
    Chains written one record per event (before step records) verify and read as before.
    """
    items = list(events)
    if not items:
        return
    seq = int(rec.get("audit_seq", 0)) + 1
    head = str(rec.get("audit_head") or GENESIS)
    # Events so far: the record's count, or (a chain an older host wrote) one a record.
    n = int(rec.get("audit_events") or seq - 1) + 1
    if len(items) == 1:
        kind, data = items[0]
    else:
        kind, data = STEP_KIND, {"events": [{"kind": k, **d} for k, d in items]}
    if n != seq:  # numbered as its seq when it is (every chain's first records): nothing stored
        data = {**data, "n": n}
    sealed, raw = _sealed(rec["agent_id"], seq, head, time.time(), kind, data)
    txn.put_blob(BUCKET, record_key(rec["agent_id"], seq), raw)
    rec["audit_seq"] = seq
    rec["audit_head"] = sealed["hash"]
    rec["audit_events"] = n + len(items) - 1


#: Where the head of a host-level chain is kept (in ``HEADS_BUCKET``), by chain id.
HOST_CHAIN_PREFIX = "chain/"


def host_chain(name: str) -> str:
    """The id of a host-level chain (``host.gateway``: the requests a server refused).
    Never an agent id (those are ULIDs), so ``torpor audit show host.gateway`` reads it."""
    return f"host.{name}"


def append_host_events(txn: Any, chain: str, events: Iterable[tuple[str, dict[str, Any]]]) -> None:
    """Seal ``events`` onto a host-level chain: what happened to the host rather than to one
    agent. Its head lives in ``HEADS_BUCKET`` (no agent record holds it) and is covered by
    the signed heads like an agent's; the records go through :func:`append_events`."""
    key = HOST_CHAIN_PREFIX + chain
    raw = txn.get_blob(HEADS_BUCKET, key)
    head = (_object(raw) or {}) if raw is not None else {}
    rec: dict[str, Any] = {"agent_id": chain, "audit_seq": int(head.get("audit_seq") or 0),
                           "audit_head": str(head.get("audit_head") or GENESIS),
                           "audit_events": head.get("audit_events")}
    append_events(txn, rec, events)
    txn.put_blob(HEADS_BUCKET, key, canonical({"audit_seq": rec["audit_seq"], "audit_head": rec["audit_head"],
                                               "audit_events": rec["audit_events"]}))


def _host_chain_heads(txn: Any) -> dict[str, dict[str, Any]]:
    """Each host-level chain's head record (``audit_seq``, ``audit_head``), by chain id."""
    out: dict[str, dict[str, Any]] = {}
    for k, raw in txn.iter_blobs(HEADS_BUCKET, HOST_CHAIN_PREFIX):
        head = _object(raw)
        out[k.removeprefix(HOST_CHAIN_PREFIX)] = head if head is not None else {"audit_seq": -1, "audit_head": ""}
    return out


def _body_hash(rec: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in rec.items() if k != "hash"})).hexdigest()


def verify_chain(records: Iterable[dict[str, Any]]) -> tuple[int, str] | None:
    """None if the records form an intact chain (from genesis or a checkpoint), else (position, what is wrong).

    Checkpoint signatures are not checked here (no key); :func:`verify_store` does.
    """
    items = [_Item(f"record {pos}", rec) for pos, rec in enumerate(records)]
    if not items:
        return None
    agent = str(items[0].rec.get("agent_id"))
    problem = check_chain(agent, items, keys=None)
    if problem is None:
        return None
    return problem.index, problem.message


# -- problems and reports ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One thing found wrong: where, what kind (modified, removed, inserted, reordered, ...), and a sentence."""

    kind: str
    message: str
    agent_id: str | None = None
    seq: int | None = None
    where: str | None = None  # "store key AGENT/000000000005", "line 12", "signed head 3"
    index: int = 0  # position in the input that was checked (for verify_chain)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "agent_id": self.agent_id, "seq": self.seq,
                "where": self.where}


@dataclass
class VerifyReport:
    """The outcome of verifying a store or an export."""

    source: str
    agents: int = 0
    records: int = 0
    heads: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # agents whose record does not decode

    @property
    def ok(self) -> bool:
        return not self.problems

    def attention(self) -> dict[str, str]:
        """The agents that need an operator's attention, and why: a broken chain, or an
        agent record that does not decode. Problems that belong to no agent (a signed
        head, the log as a whole) are not here: they are the store's."""
        out: dict[str, str] = {}
        for p in self.problems:
            if p.agent_id is not None:
                out.setdefault(p.agent_id, f"audit chain broken: {p.message}")
        for aid in self.unreadable:
            out.setdefault(aid, "its record does not decode (`torpor store check` names the damage)")
        return out

    @property
    def store_wide(self) -> bool:
        """Whether a problem belongs to no one agent (a signed head, the log as a whole)."""
        return any(p.agent_id is None for p in self.problems)

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "agents": self.agents, "records": self.records,
                "heads": self.heads, "checkpoints": self.checkpoints, "key_ids": self.key_ids,
                "first_problem": self.first.to_dict() if self.first else None,
                "problems": [p.to_dict() for p in self.problems], "notes": self.notes,
                "attention": [{"agent_id": aid, "reason": why} for aid, why in self.attention().items()]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VerifyReport:
        """The report :meth:`to_dict` described (a server's answer to ``audit/verify``), so a
        client prints and exits as on a local store."""
        problems = [Problem(kind=str(p.get("kind")), message=str(p.get("message")), agent_id=p.get("agent_id"),
                            seq=p.get("seq"), where=p.get("where")) for p in d.get("problems") or []]
        broken = {p.agent_id for p in problems}
        return cls(source=str(d.get("source", "")), agents=int(d.get("agents", 0)), records=int(d.get("records", 0)),
                   heads=int(d.get("heads", 0)), checkpoints=int(d.get("checkpoints", 0)), problems=problems,
                   key_ids=list(d.get("key_ids") or []), notes=list(d.get("notes") or []),
                   unreadable=[str(a["agent_id"]) for a in d.get("attention") or [] if a.get("agent_id") not in broken])

    def summary(self) -> str:
        if self.ok:
            return (f"audit log intact: {self.records} records of {self.agents} agents, {self.heads} signed heads, "
                    f"{self.checkpoints} checkpoints ({self.source})")
        assert self.first is not None
        more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
        return f"audit log TAMPERED ({self.source}): {self.first.message}{more}"


@dataclass
class _Item:
    where: str
    rec: dict[str, Any]
    key_seq: int | None = None
    line: int | None = None


# -- chain checking (shared by the store and exports) -----------------------------------------------------------
def _label(rec: Mapping[str, Any]) -> str:
    return f"seq {rec.get('seq')}, {rec.get('kind')}"


def check_chain(agent_id: str, items: list[_Item], *, keys: Mapping[str, Any] | None,
                anchor: tuple[int, str] = (0, GENESIS), tail: tuple[int, str] | None = None,
                tail_source: str = "the agent's recorded head") -> Problem | None:
    """The first problem in one agent's records (in stored order), or None.

    ``anchor``: (seq, hash) the first record must follow (genesis, or for a
    partial export the record before it). ``tail``: (seq, hash) the last
    record must equal. ``keys``: public keys (by id) to check a leading
    checkpoint's signature; None skips that check.
    """
    from host.trust.identity import verify_signature

    prev_seq, prev = anchor
    expected = prev_seq + 1
    seqs = [it.rec.get("seq") for it in items]

    def p(kind: str, i: int, msg: str, seq: Any = None) -> Problem:
        it = items[i] if i < len(items) else None
        s = seq if seq is not None else (it.rec.get("seq") if it else None)
        return Problem(kind, msg, agent_id, s if isinstance(s, int) else None, it.where if it else None, i)

    for i, it in enumerate(items):
        rec = it.rec
        seq = rec.get("seq")
        where = it.where
        if rec.get("agent_id") != agent_id:
            return p("inserted", i, f"{where}: a record of agent {rec.get('agent_id')} sits among agent {agent_id}'s "
                                    "records (inserted or moved)")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return p("modified", i, f"{where}: the record's seq {seq!r} is not an integer (modified)")
        if it.key_seq is not None and seq != it.key_seq:
            dup = next((j for j in range(len(items)) if j != i and seqs[j] == seq), None)
            if dup is not None:  # two records claim one seq: the one nothing links to is the intruder
                intruder = dup if not _linked(items, dup) and _linked(items, i) else i
                return p("inserted", intruder, f"{items[intruder].where} ({_label(items[intruder].rec)}) is not part "
                                               f"of agent {agent_id}'s chain (another record claims seq {seq} and the "
                                               "chain runs through it): inserted",
                         seq=items[intruder].key_seq)
            if any(items[j].rec.get("seq") == it.key_seq for j in range(len(items)) if j != i):
                return p("reordered", i, f"{where} holds the record with seq {seq} ({rec.get('kind')}): agent {agent_id}'s "
                                         f"records were reordered", seq=it.key_seq)
            return p("modified", i, f"{where} holds a record claiming seq {seq}: moved or modified", seq=it.key_seq)
        if rec.get("kind") == CHECKPOINT_KIND:
            if i != 0:
                return p("inserted", i, f"{where} ({_label(rec)}): a checkpoint can only start a chain; this one was "
                                        "inserted")
            if keys is not None:
                key = keys.get(str(rec.get("key_id")))
                body = {k: v for k, v in rec.items() if k != "sig"}
                if key is None:
                    return p("forged", i, f"{where} ({_label(rec)}): the checkpoint is signed by unknown key "
                                          f"{rec.get('key_id')}")
                if not verify_signature(key, DOMAIN_CHECKPOINT, canonical(body), str(rec.get("sig", ""))):
                    return p("modified", i, f"{where} ({_label(rec)}): the pruning checkpoint's signature does not "
                                            "verify (modified or forged)")
            if seq < expected - 1 or (prev_seq and seq <= prev_seq):
                return p("reordered", i, f"{where} ({_label(rec)}): the checkpoint does not follow seq {prev_seq}")
            prev, expected = str(rec.get("hash")), seq + 1
            continue
        if _body_hash(rec) != rec.get("hash"):
            for delta, what in ((-1, "inserted"), (1, "removed")):
                shifted = dict(rec, seq=seq + delta)
                if _body_hash(shifted) == rec.get("hash"):
                    if what == "inserted" and i > 0:
                        return p("inserted", i - 1, f"{items[i - 1].where} ({_label(items[i - 1].rec)}) was inserted: "
                                                    f"the records after it were renumbered (seq {seq + delta} now "
                                                    f"claims {seq})")
                    return p(what, i, f"{where}: record seq {seq + delta} was renumbered to {seq}: a record before it "
                                      f"was {what}", seq=seq + delta)
            return p("modified", i, f"{where} ({_label(rec)}) was modified: its hash does not match its contents")
        if seq != expected:
            if seq < expected:
                j = next((k for k in range(i) if seqs[k] == seq), None)
                if j is not None:
                    if not _linked(items, j) and _linked(items, i):
                        return p("inserted", j, f"{items[j].where} ({_label(items[j].rec)}) is not part of agent "
                                                f"{agent_id}'s chain (nothing links to it; the genuine seq {seq} is at "
                                                f"{where}): inserted")
                    return p("inserted", i, f"{where} ({_label(rec)}) repeats seq {seq}: inserted or duplicated")
                return p("reordered", i, f"{where} ({_label(rec)}) comes after seq {expected - 1}: records were "
                                         "reordered")
            if expected in seqs[i + 1:]:
                return p("reordered", i, f"{where} ({_label(rec)}) comes before seq {expected}: agent {agent_id}'s "
                                         "records were reordered")
            gap = f"seq {expected}" if seq == expected + 1 else f"seqs {expected}-{seq - 1}"
            return p("removed", i, f"agent {agent_id}'s record {gap} is missing before {where} ({_label(rec)}): removed",
                     seq=expected)
        if rec.get("prev") != prev:
            nxt = items[i + 1].rec if i + 1 < len(items) else None
            if nxt is not None and nxt.get("prev") == prev:
                return p("inserted", i, f"{where} ({_label(rec)}) is not part of agent {agent_id}'s chain: the next "
                                        "record links past it (inserted)")
            if i > 0:
                return p("modified", i - 1, f"{items[i - 1].where} ({_label(items[i - 1].rec)}) was replaced or "
                                            f"modified and re-hashed: seq {seq} links to a different record")
            return p("modified", i, f"{where} ({_label(rec)}) does not link to the record before it "
                                    f"(seq {prev_seq}): the start of the chain was altered")
        prev, expected = str(rec["hash"]), seq + 1
    if tail is not None:
        tseq, thash = tail
        last = expected - 1
        n = len(items)
        if last < tseq:
            gap = f"seq {last + 1}" if tseq == last + 1 else f"seqs {last + 1}-{tseq}"
            return Problem("removed", f"agent {agent_id}'s log ends at seq {last} but {tail_source} is seq {tseq}: "
                                      f"record {gap} removed", agent_id, last + 1, items[-1].where if items else None, n)
        if last > tseq:
            idx = next((k for k in range(n) if int(items[k].rec.get("seq") or 0) > tseq), n - 1)
            return Problem("inserted", f"{items[idx].where} (seq {tseq + 1}, {items[idx].rec.get('kind')}) is past "
                                       f"{tail_source} (seq {tseq}): appended or inserted", agent_id, tseq + 1,
                           items[idx].where, idx)
        if prev != thash:
            return Problem("modified", f"agent {agent_id}'s last record (seq {tseq}) does not match {tail_source}: the "
                                       "log was rewritten", agent_id, tseq, items[-1].where if items else None, n - 1)
    return None


def _linked(items: list[_Item], i: int) -> bool:
    """Whether another record names ``items[i]`` as its predecessor."""
    h = items[i].rec.get("hash")
    return any(items[k].rec.get("prev") == h for k in range(len(items)) if k != i)


# -- signed heads -----------------------------------------------------------------------------------------------
def _heads_digest(state: Mapping[str, Any]) -> str:
    return digest(sorted([aid, int(v[0]), str(v[1])] for aid, v in state.items()))


def _head_hash(head: Mapping[str, Any]) -> str:
    return digest(dict(head))


def seal_head(txn: Any, key: Any, *, now: float | None = None) -> dict[str, Any] | None:
    """Sign a new head over every agent's chain head, inside ``txn``; None if nothing changed.

    Reads every agent record (O(agents)); it is meant to run periodically,
    not per commit. ``key`` is a :class:`~host.trust.identity.HostKey`.
    """
    from host.trust.identity import register_public_key

    raw = txn.get_blob(HEADS_BUCKET, HEAD_STATE)
    state: dict[str, Any] | None = _object(raw) if raw else {"seq": 0, "hash": GENESIS, "map": {}}
    if state is None:
        raise AuditError(f"the state of the signed audit heads ({HEADS_BUCKET}/{HEAD_STATE}) does not decode, so no "
                         "head can be sealed on top of it; restore the store from a copy", code="record_corrupt")
    known: dict[str, list[Any]] = dict(state.get("map") or {})
    changed: dict[str, list[Any]] = {}
    chains = [*txn.iter_agents(), *({"agent_id": c, **h} for c, h in _host_chain_heads(txn).items())]
    for rec in chains:
        seq = int(rec.get("audit_seq") or 0)
        if seq <= 0:
            continue
        cur = [seq, str(rec.get("audit_head"))]
        if known.get(rec["agent_id"]) != cur:
            changed[rec["agent_id"]] = cur
    if not changed and state["seq"]:
        return None
    known.update(changed)
    register_public_key(txn, key)
    head: dict[str, Any] = {
        "seq": int(state["seq"]) + 1, "t": time.time() if now is None else now, "prev": state["hash"],
        "count": sum(int(v[0]) for v in known.values()), "agents": len(known),
        "heads_digest": _heads_digest(known), "changed": changed, "key_id": key.key_id,
    }
    head["sig"] = key.sign(DOMAIN_HEAD, canonical(head))
    txn.put_blob(HEADS_BUCKET, _head_key(head["seq"]), canonical(head))
    txn.put_blob(HEADS_BUCKET, HEAD_STATE, canonical({"seq": head["seq"], "hash": _head_hash(head), "t": head["t"],
                                                      "map": known}))
    return head


class HeadSealer:
    """Seals a signed head at most every ``interval_s`` (across processes: the last head's time is stored)."""

    def __init__(self, store: Any, key: Callable[[], Any], *, interval_s: float = DEFAULT_HEAD_INTERVAL_S) -> None:
        self.store = store
        self._key = key
        self.interval_s = float(interval_s)
        self._last_check = -math.inf

    def due(self) -> bool:
        """Cheap: whether this process should look (not more often than the interval)."""
        return time.monotonic() - self._last_check >= self.interval_s

    def maybe_seal(self, *, force: bool = False) -> dict[str, Any] | None:
        """Seal a head if the last one is older than the interval (or ``force``) and the log changed."""
        self._last_check = time.monotonic()
        if not force:
            with self.store.read() as txn:
                raw = txn.get_blob(HEADS_BUCKET, HEAD_STATE)
            state = _object(raw) if raw is not None else None
            if state is not None and time.time() - float(state.get("t", 0)) < self.interval_s:
                return None
        try:
            key = self._key()
            result: dict[str, Any] | None = self.store.transact(lambda txn: seal_head(txn, key))
        except (AuditError, StoreError) as exc:
            if force:
                raise
            # Periodic and best effort: a damaged state or a full disk must not fail the agent
            # whose finish (or host's close) it runs after; the next one seals the head.
            _log.warning("the audit head was not sealed: %s", exc)
            return None
        return result


@dataclass
class _HeadCheck:
    problems: list[Problem]
    claims: list[tuple[str, str, int, str]]  # (where, agent, seq, hash)
    count: int


def _check_heads(heads: list[tuple[str, dict[str, Any]]], keys: Mapping[str, Any]) -> _HeadCheck:
    from host.trust.identity import verify_signature

    problems: list[Problem] = []
    claims: list[tuple[str, str, int, str]] = []
    state: dict[str, list[Any]] = {}
    prev, expected = GENESIS, 1
    for where, head in heads:
        seq = head.get("seq")
        if seq is None:
            problems.append(Problem("modified", f"{where} does not decode (damaged or modified)", where=where))
            break
        if seq != expected:
            what = "removed" if isinstance(seq, int) and seq > expected else "reordered"
            problems.append(Problem(what, f"{where}: signed head seq {seq} where seq {expected} was expected "
                                          f"(a head was {what})", where=where))
            break
        key = keys.get(str(head.get("key_id")))
        body = {k: v for k, v in head.items() if k != "sig"}
        if key is None:
            problems.append(Problem("forged", f"{where}: signed by unknown key {head.get('key_id')}", where=where))
            break
        if not verify_signature(key, DOMAIN_HEAD, canonical(body), str(head.get("sig", ""))):
            problems.append(Problem("modified", f"{where}: the signature of signed head {seq} does not verify "
                                                "(modified or forged)", where=where))
            break
        if head.get("prev") != prev:
            problems.append(Problem("modified", f"{where}: signed head {seq} does not link to head {seq - 1}",
                                    where=where))
            break
        changed = head.get("changed") or {}
        state.update(changed)
        if _heads_digest(state) != head.get("heads_digest") or sum(int(v[0]) for v in state.values()) != head.get("count"):
            problems.append(Problem("removed", f"{where}: the heads recorded up to signed head {seq} do not add up to "
                                               "its signed digest (a head was removed)", where=where))
            break
        for aid, (s, h) in changed.items():
            claims.append((where, aid, int(s), str(h)))
        prev, expected = _head_hash(head), expected + 1
    return _HeadCheck(problems, claims, expected - 1)


def _check_claims(claims: list[tuple[str, str, int, str]], chains: Mapping[str, list[_Item]],
                  ranges: Mapping[str, tuple[int, int]]) -> Problem | None:
    """Every (agent, seq, hash) a signed head vouches for must be in the log, unchanged.

    ``ranges``: per agent, the (first, last) seqs available to check; claims
    below ``first`` (pruned, or before an export's ``--since``) are skipped.
    """
    by_seq = {aid: {it.rec.get("seq"): it for it in items} for aid, items in chains.items()}
    for where, aid, seq, h in claims:
        first, last = ranges.get(aid, (1, 0))
        if seq < first:
            continue
        if seq > last:
            gap = f"seq {last + 1}" if seq == last + 1 else f"seqs {last + 1}-{seq}"
            return Problem("removed", f"{where} vouches for agent {aid}'s record seq {seq}, but the log ends at seq "
                                      f"{last}: record {gap} removed", aid, last + 1, where)
        it = by_seq.get(aid, {}).get(seq)
        if it is None:
            return Problem("removed", f"{where} vouches for agent {aid}'s record seq {seq}, which is missing (removed)",
                           aid, seq, where)
        if it.rec.get("hash") != h:
            return Problem("modified", f"{it.where} ({_label(it.rec)}) differs from what {where} signed: the record "
                                       "was rewritten (with its chain re-hashed)", aid, seq, it.where)
    return None


# -- the store ------------------------------------------------------------------------------------------------
def _trusted_keys(txn: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    from host.trust.identity import known_public_keys

    keys = known_public_keys(txn)
    keys.update(extra or {})
    return keys


def verify_store(store: Any, *, public_keys: Mapping[str, Any] | None = None, agent_id: str | None = None) -> VerifyReport:
    """Check every chain, every agent's head, every signed head and checkpoint of a store.

    Streams the log one agent at a time (memory: one agent's records), in one
    read transaction, so a live host may keep appending meanwhile. Problems
    come in this order: a broken signed head (it puts everything it vouches
    for in doubt), then the first record a signed head vouches for that is
    gone or different, then each broken chain in agent-id order; so
    ``report.first`` names the most telling one.
    """
    report = VerifyReport(source="store")
    claim_problems: list[Problem] = []
    chain_problems: list[Problem] = []
    with store.read() as txn:
        keys = _trusted_keys(txn, public_keys)
        report.key_ids = sorted(keys)
        heads = [(f"signed head {k.removeprefix(HEAD_PREFIX).lstrip('0') or '0'}", _object(v) or {"seq": None})
                 for k, v in txn.iter_blobs(HEADS_BUCKET, HEAD_PREFIX)]
        report.heads = len(heads)
        hc = _check_heads(heads, keys)
        report.problems.extend(hc.problems)
        claims: dict[str, list[tuple[str, str, int, str]]] = {}
        if not hc.problems:
            for c in hc.claims:
                if agent_id is None or c[1] == agent_id:
                    claims.setdefault(c[1], []).append(c)
        seen: set[str] = set()
        host_heads = _host_chain_heads(txn)

        def check(aid: str, items: list[_Item]) -> None:
            seen.add(aid)
            report.agents += 1
            report.records += len(items)
            report.checkpoints += sum(1 for it in items if it.rec.get("kind") == CHECKPOINT_KIND)
            rec = txn.get_agent(aid) if aid not in host_heads else {"agent_id": aid, **host_heads[aid]}
            if rec is not None and rec.get(UNREADABLE):
                # Its head is in a record that does not decode: the chain is checked on its own.
                report.unreadable.append(aid)
                report.notes.append(f"agent {aid}'s record does not decode, so its log is checked without its head "
                                    "(`torpor store check` names the damage)")
                rec = None
                tail = None
            else:
                tail = (int(rec.get("audit_seq") or 0), str(rec.get("audit_head") or GENESIS)) if rec is not None else None
            problem = check_chain(aid, items, keys=keys, tail=tail)
            if problem is not None:
                chain_problems.append(problem)
            elif rec is None and items:
                report.notes.append(f"agent {aid} has audit records but no agent record (deleted); its tail is "
                                    "checked only against signed heads")
            if aid in claims:
                first = int(items[0].rec.get("seq") or 1) if items and items[0].rec.get("kind") == CHECKPOINT_KIND else 1
                last = int(items[-1].rec.get("seq") or 0) if items else 0
                found = _check_claims(claims[aid], {aid: items}, {aid: (first, last)})
                if found is not None:
                    claim_problems.append(found)

        current: str | None = None
        items: list[_Item] = []
        for k, raw in txn.iter_blobs(BUCKET, f"{agent_id}/" if agent_id else ""):
            aid, _, tail_key = k.partition("/")
            if aid != current:
                if current is not None:
                    check(current, items)
                current, items = aid, []
            items.append(_Item(f"store key {k}", _record(k, raw), int(tail_key) if tail_key.isdigit() else -1))
        if current is not None:
            check(current, items)
        # Agents whose every record is gone: their head (or a signed head) still says they had some.
        if agent_id is not None:
            rec = txn.get_agent(agent_id)
            missing = [agent_id] if agent_id not in seen and (agent_id in claims or (rec and rec.get("audit_seq"))) else []
        else:
            missing = [a["agent_id"] for a in txn.iter_agents() if int(a.get("audit_seq") or 0) > 0
                       and a["agent_id"] not in seen]
            missing += [a for a in claims if a not in seen and a not in missing]
            missing += [c for c, h in host_heads.items() if int(h.get("audit_seq") or 0) > 0 and c not in seen
                        and c not in missing]
        for aid in sorted(missing):
            check(aid, [])
    report.problems.extend(claim_problems[:1])
    report.problems.extend(sorted(chain_problems, key=lambda pr: pr.agent_id or ""))
    if not heads:
        report.notes.append("no signed head yet: run `torpor audit seal` (hosts seal one periodically)")
    return report


# -- export -----------------------------------------------------------------------------------------------------
def _line(obj: dict[str, Any]) -> bytes:
    return canonical(obj) + b"\n"


def export(store: Any, out: IO[bytes], key: Any, *, since: float | None = None,
           agent_id: str | None = None) -> dict[str, Any]:
    """Write the log as signed JSON Lines to ``out``; returns a summary.

    With ``since``, each agent's records from the first one at or after that
    time; the manifest line of each agent carries the hash its first exported
    record must link to, so a dropped first record is still caught.
    """
    h = hashlib.sha256()
    n = 0

    def emit(obj: dict[str, Any]) -> None:
        nonlocal n
        data = _line(obj)
        h.update(data)
        out.write(data)
        n += 1

    from host.trust.identity import b64e, public_raw, register_public_key

    def register(txn: Any) -> None:
        register_public_key(txn, key)

    store.transact(register)
    now = time.time()
    records = 0
    with store.read() as txn:
        keys = _trusted_keys(txn, None)
        emit({"header": {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_at": now, "since": since,
                         "agent": agent_id, "key_id": key.key_id,
                         "public_keys": {kid: b64e(public_raw(k)) for kid, k in sorted(keys.items())}}})
        chains: dict[str, list[dict[str, Any]]] = {}
        for k, raw in txn.iter_blobs(BUCKET, f"{agent_id}/" if agent_id else ""):
            rec = _object(raw)
            if rec is None:
                raise AuditError(f"audit record {k} does not decode, so no export of it could verify; "
                                 "`torpor audit verify` and `torpor store check` name the damage",
                                 code="record_corrupt")
            chains.setdefault(str(rec.get("agent_id")), []).append(rec)
        for aid in sorted(chains):
            recs = chains[aid]
            start = 0
            if since is not None:
                start = next((i for i, r in enumerate(recs) if float(r.get("t", 0)) >= since), len(recs))
            chosen = recs[start:]
            anchor_seq = int(recs[start - 1]["seq"]) if start > 0 else 0
            anchor_hash = str(recs[start - 1]["hash"]) if start > 0 else GENESIS
            last = recs[-1]
            emit({"agent": {"agent_id": aid, "from_seq": anchor_seq + 1, "anchor": [anchor_seq, anchor_hash],
                            "to_seq": int(last["seq"]), "head": str(last["hash"]), "records": len(chosen)}})
            for rec in chosen:
                emit({"record": rec})
                records += 1
        for k, raw in txn.iter_blobs(HEADS_BUCKET, HEAD_PREFIX):
            head = _object(raw)
            if head is None:
                raise AuditError(f"signed head {k} does not decode, so no export of it could verify; "
                                 "`torpor audit verify` names the damage", code="record_corrupt")
            emit({"head": head})
    body = {"lines": n, "digest": h.hexdigest(), "key_id": key.key_id, "exported_at": now}
    out.write(_line({"seal": {**body, "sig": key.sign(DOMAIN_EXPORT, canonical(body))}}))
    return {"lines": n + 1, "records": records, "agents": len(chains), "key_id": key.key_id}


def verify_export(lines: Iterable[bytes | str], *, public_keys: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check an export without the store: chains, manifest, signed heads, then the seal.

    ``public_keys`` pins the signer: without it the export's own declared key
    is used (which proves integrity against accidents and against anyone who
    did not also re-sign it), and the report notes that it was not pinned.
    """
    from host.trust.identity import public_key_from, verify_signature

    report = VerifyReport(source="export")
    h = hashlib.sha256()
    header: dict[str, Any] | None = None
    manifests: dict[str, tuple[int, dict[str, Any]]] = {}
    chains: dict[str, list[_Item]] = {}
    heads: list[tuple[str, dict[str, Any]]] = []
    seal_obj: dict[str, Any] | None = None
    seal_line = 0
    current: str | None = None
    n = 0
    for lineno, raw in enumerate(lines, start=1):
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        if not data.strip():
            continue
        if seal_obj is not None:
            report.problems.append(Problem("inserted", f"line {lineno}: content after the export's seal (appended)",
                                           where=f"line {lineno}"))
            return report
        try:
            obj = json.loads(data)
        except ValueError:
            report.problems.append(Problem("modified", f"line {lineno} is not JSON (modified or truncated)",
                                           where=f"line {lineno}"))
            return report
        if not isinstance(obj, dict) or len(obj) != 1 or not isinstance(next(iter(obj.values())), dict):
            report.problems.append(Problem("modified", f"line {lineno} is not an export line", where=f"line {lineno}"))
            return report
        (kind, value), = obj.items()
        if kind == "seal":
            seal_obj, seal_line = value, lineno
            continue
        h.update(canonical(obj) + b"\n")
        n += 1
        if kind == "header":
            if header is not None or lineno != 1 or value.get("format") != EXPORT_FORMAT:
                report.problems.append(Problem("modified", f"line {lineno}: unexpected export header", where=f"line {lineno}"))
                return report
            header = value
        elif kind == "agent":
            current = str(value.get("agent_id"))
            manifests[current] = (lineno, value)
            chains.setdefault(current, [])
        elif kind == "record":
            rec = value if isinstance(value, dict) else {}
            aid = str(rec.get("agent_id"))
            target = current if current is not None else aid
            chains.setdefault(target, []).append(_Item(f"line {lineno}", rec, line=lineno))
        elif kind == "head":
            heads.append((f"line {lineno} (signed head {value.get('seq')})", value))
        else:
            report.problems.append(Problem("modified", f"line {lineno}: unknown line type {kind!r}", where=f"line {lineno}"))
            return report
    if header is None:
        report.problems.append(Problem("modified", "the file does not start with an export header (not an export, "
                                                   "or its first line was removed)", where="line 1"))
        return report
    declared: dict[str, Any] = {}
    for kid, b in (header.get("public_keys") or {}).items():
        try:
            declared[str(kid)] = public_key_from(str(b))
        except ConfigError:
            continue
    keys = dict(public_keys) if public_keys else declared
    report.key_ids = sorted(keys)
    if not public_keys:
        report.notes.append(f"signatures checked against the keys the export declares ({', '.join(sorted(declared))}); "
                            "pass --public-key (or verify on the host, whose key is pinned) to pin the signer")
    report.heads = len(heads)
    ranges: dict[str, tuple[int, int]] = {}
    for aid in sorted(chains):
        items = chains[aid]
        report.records += len(items)
        report.checkpoints += sum(1 for it in items if it.rec.get("kind") == CHECKPOINT_KIND)
        man = manifests.get(aid)
        if man is None:
            report.problems.append(Problem("inserted", f"{items[0].where}: records of agent {aid} with no manifest line "
                                                       "(inserted)", aid, items[0].rec.get("seq"), items[0].where))
            continue
        mline, m = man
        anchor_raw = m.get("anchor") or [0, GENESIS]
        problem = check_chain(aid, items, keys=keys, anchor=(int(anchor_raw[0]), str(anchor_raw[1])),
                              tail=(int(m.get("to_seq", 0)), str(m.get("head"))),
                              tail_source=f"the manifest (line {mline})")
        if problem is None and len(items) != int(m.get("records", len(items))):
            problem = Problem("removed", f"agent {aid}: the manifest (line {mline}) lists {m.get('records')} records, "
                                         f"the export holds {len(items)}", aid, None, f"line {mline}")
        if problem is not None:
            report.problems.append(problem)
        first = int(anchor_raw[0]) + 1
        if items and items[0].rec.get("kind") == CHECKPOINT_KIND:
            first = int(items[0].rec.get("seq") or first)
        ranges[aid] = (first, int(m.get("to_seq", 0)))
    report.agents = len(chains)
    report.problems.sort(key=lambda pr: (int(pr.where.split()[1]) if pr.where and pr.where.startswith("line ")
                                         and pr.where.split()[1].isdigit() else 0))
    hc = _check_heads(heads, keys)
    report.problems[:0] = hc.problems
    if not hc.problems and not report.problems:
        # Claims about agents absent from a partial export cannot be checked; a full export must hold them all.
        absent = [c for c in hc.claims if c[1] not in ranges]
        if absent and header.get("since") is None and header.get("agent") is None:
            where, aid, seq, _ = absent[0]
            report.problems.append(Problem("removed", f"{where} vouches for agent {aid} (seq {seq}), whose records are "
                                                      "missing from the export (removed)", aid, seq, where))
        claim = _check_claims([c for c in hc.claims if c[1] in ranges], chains, ranges)
        if claim is not None:
            report.problems.append(claim)
    if seal_obj is None:
        report.problems.append(Problem("removed", "the export has no seal line (truncated: its end was removed)",
                                       where="end of file"))
        return report
    body = {k: v for k, v in seal_obj.items() if k != "sig"}
    seal_key = keys.get(str(seal_obj.get("key_id")))
    where = f"line {seal_line} (seal)"
    if seal_key is None:
        report.problems.append(Problem("forged", f"{where}: sealed by key {seal_obj.get('key_id')}, which is not the "
                                                 "pinned key", where=where))
    elif not verify_signature(seal_key, DOMAIN_EXPORT, canonical(body), str(seal_obj.get("sig", ""))):
        report.problems.append(Problem("modified", f"{where}: the seal's signature does not verify", where=where))
    elif (body.get("lines") != n or body.get("digest") != h.hexdigest()) and not report.problems:
        report.problems.append(Problem("modified", f"{where}: the export's content does not match its seal "
                                                       f"({n} lines, seal says {body.get('lines')}): lines were "
                                                       "altered, added or removed", where=where))
    return report


# -- retention ------------------------------------------------------------------------------------------------
def prune(store: Any, key: Any, *, before: float, agent_id: str | None = None,
          now: float | None = None) -> dict[str, Any]:
    """Delete each agent's records older than ``before``, leaving a signed checkpoint in their place.

    Only a prefix is pruned (records up to the first one at or after
    ``before``); an agent whose chain does not verify is left untouched and
    reported, so pruning can never launder tampering. Each agent is pruned in
    its own transaction.
    """
    from host.trust.identity import register_public_key

    t_now = time.time() if now is None else now
    with store.read() as txn:
        agent_ids = sorted({k.partition("/")[0] for k, _ in txn.iter_blobs(BUCKET, f"{agent_id}/" if agent_id else "")})
        keys = _trusted_keys(txn, {key.key_id: key.public})
    pruned_agents = 0
    pruned_records = 0
    refused: list[dict[str, Any]] = []

    for aid in agent_ids:
        def write(txn: Any, aid: str = aid) -> int:
            items = [_Item(f"store key {k}", _record(k, v), int(k.partition("/")[2]))
                     for k, v in txn.iter_blobs(BUCKET, f"{aid}/")]
            problem = check_chain(aid, items, keys=keys)
            if problem is not None:
                raise AuditError(problem.message, code="audit_tampered")
            cut = 0
            while cut < len(items) and float(items[cut].rec.get("t", 0)) < before:
                cut += 1
            if cut == 0 or (cut == 1 and items[0].rec.get("kind") == CHECKPOINT_KIND):
                return 0
            last = items[cut - 1].rec
            first = items[0].rec
            earlier = first.get("pruned") if first.get("kind") == CHECKPOINT_KIND else None
            count = sum(1 for it in items[:cut] if it.rec.get("kind") != CHECKPOINT_KIND)
            cp: dict[str, Any] = {
                "agent_id": aid, "seq": int(last["seq"]), "kind": CHECKPOINT_KIND, "t": t_now,
                "hash": str(last["hash"]),
                "pruned": {"from_seq": int(earlier["from_seq"]) if earlier else int(first["seq"]),
                           "to_seq": int(last["seq"]), "count": count + (int(earlier["count"]) if earlier else 0),
                           "before": before, "last_t": float(last.get("t", 0))},
                "key_id": key.key_id,
            }
            cp["sig"] = key.sign(DOMAIN_CHECKPOINT, canonical(cp))
            for it in items[:cut]:
                txn.delete_blob(BUCKET, record_key(aid, int(it.rec["seq"])))
            txn.put_blob(BUCKET, record_key(aid, int(last["seq"])), canonical(cp))
            register_public_key(txn, key)
            return count

        try:
            n = int(store.transact(write))
        except AuditError as exc:
            refused.append({"agent_id": aid, "reason": str(exc)})
            continue
        if n:
            pruned_agents += 1
            pruned_records += n
    return {"agents": pruned_agents, "records": pruned_records, "before": before, "refused": refused}


# -- reading --------------------------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")


def parse_time(text: str, *, now: float | None = None) -> float:
    """A point in time: Unix seconds, ISO 8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``), or an age (``30d``)."""
    s = text.strip()
    t_now = time.time() if now is None else now
    m = _DURATION.match(s)
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return t_now - float(m.group(1)) * mult
    try:
        return float(s)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is not a time: use Unix seconds, ISO 8601 (2024-05-01T12:00:00Z) or an age "
                          "like 30d, 12h, 15m") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def records(store: Any, agent_id: str) -> list[dict[str, Any]]:
    """The agent's audit events in order, a step record's one by one (:func:`expand`); one
    record that does not decode is a stand-in (``UNREADABLE_KIND``)."""
    with store.read() as txn:
        return [e for k, v in txn.iter_blobs(BUCKET, f"{agent_id}/") for e in expand(_record(k, v))]


def stored_records(store: Any, agent_id: str) -> list[dict[str, Any]]:
    """The agent's audit records as stored (a step record whole): what the chain links."""
    with store.read() as txn:
        return [_record(k, v) for k, v in txn.iter_blobs(BUCKET, f"{agent_id}/")]


def records_after(store: Any, agent_id: str, seq: int) -> list[dict[str, Any]]:
    """The agent's events (:func:`records`) after record ``seq``, in order: read key by key from
    ``seq + 1``, so that a follower of a live log reads what is new, not the whole log
    again. When ``seq + 1`` was pruned away, the records kept after ``seq`` instead."""
    with store.read() as txn:
        if seq <= 0:
            return [e for k, v in txn.iter_blobs(BUCKET, f"{agent_id}/") for e in expand(_record(k, v))]
        out: list[dict[str, Any]] = []
        n = seq + 1
        while (raw := txn.get_blob(BUCKET, record_key(agent_id, n))) is not None:
            out.extend(expand(_record(record_key(agent_id, n), raw)))
            n += 1
        if out:
            return out
        first = next(txn.iter_blobs(BUCKET, f"{agent_id}/"), None)
        tail = first[0].partition("/")[2] if first is not None else ""
        if not tail.isdigit() or int(tail) <= seq:
            return []  # nothing new
        return [e for r in (_record(k, v) for k, v in txn.iter_blobs(BUCKET, f"{agent_id}/"))
                if isinstance(r.get("seq"), int) and r["seq"] > seq for e in expand(r)]


def _short(h: Any) -> str:
    return str(h)[:12] if h else "-"


def describe(rec: Mapping[str, Any]) -> str:
    """One readable line for a record of the decision trace."""
    kind = str(rec.get("kind"))
    d = dict(rec)
    call = f"call {d.get('call_seq')} {d.get('tool')}" if "call_seq" in d else ""
    dec = d.get("decision") if isinstance(d.get("decision"), dict) else {}
    if kind == "agent.spawned":
        return (f"spawned {d.get('name')} (bundle {_short(d.get('bundle_digest'))})"
                f"{' on behalf of ' + str(d['principal']) if d.get('principal') else ''}; input sha256 "
                f"{_short(d.get('input_digest'))}")
    if kind == "identity.issued":
        return f"identity token {_short(d.get('token_id'))} issued, key {d.get('key_id')}, expires {_iso(d.get('expires_at'))}"
    if kind == "identity.revoked":
        return f"identity token {_short(d.get('token_id'))} revoked ({d.get('reason')})"
    if kind == "tool.requested":
        return f"{call} requested, args sha256 {_short(d.get('args_digest'))}"
    if kind.startswith("tool.") and dec:
        rule = dec.get("rule") or ", ".join(dec.get("rules") or []) or "-"
        reason = f": {dec['reason']}" if dec.get("reason") else ""
        code = f" [{dec['code']}]" if dec.get("code") else ""
        return f"{call} {kind.removeprefix('tool.')} by rule {rule}{code}{reason}"
    if kind == "tool.answered":
        return f"{call} answered, status {d.get('status')}, result sha256 {_short(d.get('result_digest'))}"
    if kind == "checkpoint":
        return f"checkpoint {d.get('checkpoint', '')} written ({d.get('size')} bytes)"
    if kind in ("credential.leased", "credential.renewed"):
        extra = f", replacing expired lease {_short(d.get('replaces'))}" if d.get("replaces") else ""
        return (f"credential {d.get('name')} {kind.split('.')[1]} to {d.get('tool')} (lease {_short(d.get('lease_id'))}, "
                f"expires {_iso(d.get('expires_at'))}){extra}")
    if kind == "credential.revoked":
        return f"credentials revoked: {', '.join(d.get('names') or [])}"
    if kind == "agent.completed":
        return f"completed, output sha256 {_short(d.get('output_digest'))}"
    if kind in ("agent.failed", "agent.terminated"):
        err = d.get("error") or {}
        return f"{kind.removeprefix('agent.')}: [{err.get('code')}] {err.get('message')}"
    if kind == UNREADABLE_KIND:
        return f"the record at {d.get('key')} does not decode (damaged or modified)"
    if kind == CHECKPOINT_KIND:
        p = d.get("pruned") or {}
        return (f"{p.get('count')} earlier records (seq {p.get('from_seq')}-{p.get('to_seq')}) pruned before "
                f"{_iso(p.get('before'))}; signed checkpoint by key {d.get('key_id')}")
    skip = {"agent_id", "seq", "t", "kind", "prev", "hash"}
    rest = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in d.items() if k not in skip)
    return rest


def _iso(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))
    except (TypeError, ValueError):
        return "-"


def trace_lines(recs: list[dict[str, Any]]) -> Iterator[str]:
    """The decision trace, one line per record: seq, UTC time, kind, what happened."""
    for rec in recs:
        try:
            t = float(rec.get("t"))  # type: ignore[arg-type]
            ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}"
        except (TypeError, ValueError):
            ts = "-"
        yield f"#{rec.get('seq'):<5} {ts}  {rec.get('kind')!s:<26} {describe(rec)}"
