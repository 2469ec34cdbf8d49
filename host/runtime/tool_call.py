"""The life of one tool call, top to bottom: this module is the durability protocol.

When a guest calls ``tool_call`` its instance unwinds (:mod:`host.sandbox.execution`)
and the runtime is handed a :class:`~host.sandbox.execution.Suspended` outcome. From
there, in the order they happen, each stage a pure decision or one side effect:

1. :meth:`ToolCallPipeline.receive`   count the stop, capture the guest's state (memory, globals);
2. :meth:`ToolCallPipeline.request`   the call as a policy request (refused if its arguments are not JSON);
3. :meth:`ToolCallPipeline.decide`    the policy decides (pure: :func:`policies.decide`) and usage is counted;
4. :meth:`ToolCallPipeline.route`     terminate, park for approval, deny, or go on to the tool;
5. :meth:`ToolCallPipeline.snapshot`  encode checkpoint *K*: a delta against the pristine image;
6. :meth:`ToolCallPipeline.commit`    checkpoint *K*, the journal's *intent* (or the answer, when
   already known) and the audit records: one commit;
7. :meth:`ToolCallPipeline.lease`     the tool's context, with the secrets its grant names (host side only);
8. :meth:`ToolCallPipeline.run`       the tool runs while the instance waits warm, or goes cold;
9. :meth:`ToolCallPipeline.journal`   the tool's answer is journaled;
10. :meth:`ToolCallPipeline.check_budgets`  a limit crossed by the call (tokens) terminates the agent;
11. the answer goes back to the guest (:meth:`host.runtime.guest.GuestRunner.answer`): the
    instance is rewound in place if it is still warm, or rebuilt from checkpoint *K*.

A transactional tool (``kv.incr``) folds 6, 8 and 9 into one commit: its effect lands
with its checkpoint and its result, or not at all.

Two waits on a time sit between 4 and 8 (:mod:`host.runtime.timers`): ``timer.sleep``
(allowed, it waits, then runs) and a call over a rate whose grant says ``on_limit =
"wait"`` (:meth:`ToolCallPipeline.back_off`: it waits, then is decided again). Either
journals its wake time with checkpoint *K* (:meth:`ToolCallPipeline.wait_until`), then holds
a short wait in-process or parks the agent ``sleeping`` with its wake-up in the same commit.

After a crash, :meth:`ToolCallPipeline.recover` answers a resumed agent's pending call
from the journal: a recorded answer is replayed; a call with an intent but no answer is
run again only when the tool is idempotent or transactional, otherwise the agent is
parked ``in_doubt`` for an operator. No recorded tool call ever runs twice.

With ``checkpoint_every`` above 1 (``Host``), stages 1 and 5 skip the capture and
checkpoint *K* of an allowed transactional call between checkpoints
(:meth:`ToolCallPipeline.journal_only`): its journaled answer, committed with its effect, is
what a resume feeds the guest re-executed from the last checkpoint
(:meth:`ToolCallPipeline.replayed`) before it goes live again. Such a call is answered
inside the guest's ``tool_call`` import when it can be at once, with no unwind and rewind
(:meth:`ToolCallPipeline.answer_inline`): the same stages, committed synchronously.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import anyio
import anyio.lowlevel
import anyio.to_thread

import policies
from host.errors import TorporError
from host.runtime import answers, budgets, timers
from host.runtime.agent import Answer, LiveAgent
from host.runtime.commits import AgentCommits, Events
from host.runtime.guest import GuestRunner
from host.runtime.logs import Pending
from host.runtime.overlay import WriteOverlay
from host.sandbox import abi
from host.sandbox.execution import Captured, Completed, Failed, Outcome, PendingCall, Suspended
from host.tools.registry import InputRequired, ToolContext, ToolError, ToolSpec
from host.trust import audit
from host.trust.credentials import CredentialBroker, bindings, scrub_values
from host.trust.scrub import Scrubber, scrubbing
from snapshots.errors import RecordCorrupt
from snapshots.format import Snapshot, encode_checkpoint
from snapshots.store import AgentStore

log = logging.getLogger("torpor.tools")

_DECISION_EVENT = {"allow": "tool.allowed", "deny": "tool.denied", "approval": "tool.approval_requested",
                   "terminate": "tool.terminated"}

#: How long an agent runs its calls before it lets the rest of the event loop run.
SLICE_S = 0.001

#: The longest an agent goes between checkpoints while its calls are answered from the
#: journal alone (:meth:`ToolCallPipeline.journal_only`), beside the count of calls: what
#: a resume re-executes is bounded by the guest time since the checkpoint, and a quarter
#: second of it is little beside a process restart, while at ~1,000 calls/s a checkpoint
#: every 0.25 s is one in hundreds of calls.
CHECKPOINT_EVERY_S = 0.25


class ReplayDiverged(TorporError):
    """An agent re-executed from its checkpoint made a call its journal does not hold as made:
    another tool, other arguments, or another fuel count (the bundle, the host or the store
    is not what ran). Its stored state is left as it is, the agent parked for an operator."""

    code = "replay_diverged"


@dataclass(frozen=True)
class Ended:
    """The agent is done: it completed, failed, or was terminated (``status``, ``report``)."""

    outcome: Completed | Failed
    status: str | None = None
    report: dict[str, Any] | None = None


@dataclass(frozen=True)
class Parked:
    """The agent waits on a person or a time; it holds nothing but its checkpoint."""


@dataclass(frozen=True)
class Backoff:
    """A call over a rate whose grant waits (``on_limit = "wait"``): decide it again at ``at``."""

    at: float
    decision: policies.Decision


@dataclass(frozen=True)
class Checkpoint:
    """Checkpoint *K*, encoded and ready to be written."""

    seq: int
    blob: bytes
    created: float
    #: The content chunks a format-3 record names (by digest); empty for an inline record.
    chunks: dict[bytes, bytes | memoryview]


class _Turn:
    """An agent's turn on the event loop: :data:`SLICE_S` of running without giving the loop
    back. A turn ends when the agent gives the loop back by itself (a commit it waits for, a
    worker thread): then the next one starts, rather than a yield it no longer owes. Seen by
    a callback put on the loop when the turn starts, which runs only once the loop has run."""

    __slots__ = ("end", "yielded")

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.end = time.monotonic() + SLICE_S
        self.yielded = False
        with contextlib.suppress(RuntimeError):  # another backend: turns end on time alone
            asyncio.get_running_loop().call_soon(self._mark)

    def _mark(self) -> None:
        self.yielded = True

    def spent(self) -> bool:
        """Whether the agent has held the loop for its slice, with no yield (a new turn then)."""
        if self.yielded:
            self.start()
            return False
        return time.monotonic() >= self.end


class Prepared(NamedTuple):
    """An allowed call ready to run (:meth:`ToolCallPipeline.prepare`)."""

    args: Any
    ctx: ToolContext
    scrub: Scrubber


class _Undo:
    """What the stages before a commit change in an agent, kept to be put back when a call
    answered inline declines after them (:meth:`ToolCallPipeline.answer_inline`)."""

    __slots__ = ("agent", "captured", "events", "record", "since_checkpoint", "stopped_at", "usage")

    def __init__(self, agent: LiveAgent) -> None:
        self.agent = agent
        self.record = dict(agent.record)
        self.usage = dict(agent.usage)  # its counters are replaced, never changed in place
        self.events = len(agent.events)
        self.captured, self.stopped_at, self.since_checkpoint = agent.captured, agent.stopped_at, agent.since_checkpoint

    def __call__(self) -> None:
        agent = self.agent
        agent.record.clear()
        agent.record.update(self.record)
        agent.usage.clear()
        agent.usage.update(self.usage)
        del agent.events[self.events:]
        agent.captured, agent.stopped_at, agent.since_checkpoint = self.captured, self.stopped_at, self.since_checkpoint


class ToolCallPipeline:
    """Serves an agent's tool calls until it completes, fails, or parks.

    ``checkpoint_every``: the most calls a checkpoint covers (1: a checkpoint at every
    call; more: transactional calls between them are replayed from the journal after a
    crash, see :meth:`journal_only`)."""

    checkpoint_every: int = 1

    def __init__(self, store: AgentStore, commits: AgentCommits, guest: GuestRunner,
                 broker: CredentialBroker | None, mcp_config: Any = None) -> None:
        self.store = store
        self.commits = commits
        self.guest = guest
        self.broker = broker
        self.mcp_config = mcp_config  # the operator's MCP servers and roots (host.tools.mcp_config)
        self.answered_inline = 0  # calls answered inside the guest's import (:meth:`answer_inline`)

    async def serve(self, agent: LiveAgent, outcome: Outcome) -> Ended | Parked:
        """Answer each call the guest stops at, and run it on, until it ends or parks.

        A call whose tool, commit and next segment all run inline never gives the event
        loop back by itself, so an agent making thousands of fast calls would hold every
        other task of the loop (a server's requests, the other agents) until it ended. It
        yields once per time slice instead (:data:`SLICE_S`), as a preemptive scheduler
        would: cheap (one yield per slice, not per call), and fair to everyone waiting.
        Calls answered inside the guest's import (:meth:`answer_inline`) are answered only
        within the slice; past it the next call unwinds, and the loop runs."""
        turn = _Turn()

        def inline(call: PendingCall) -> Answer | None:  # past the slice, the call unwinds and the loop runs
            return None if turn.spent() else self.answer_inline(agent, call)

        ask = inline if self.checkpoint_every > 1 else None
        while isinstance(outcome, Suspended):
            if turn.spent():  # here, before the call: one the slice's end unwound waits for the next turn
                await anyio.lowlevel.checkpoint()
                turn.start()
            call = outcome.call
            step = await self.call(agent, call)
            if isinstance(step, Ended | Parked):
                return step
            outcome = await self.guest.answer(agent, call, *step, inline=ask)
        return Ended(outcome)

    async def call(self, agent: LiveAgent, call: PendingCall) -> Answer | Ended | Parked:
        """Stages 1 to 10 for one call: its answer, or how the agent ended or parked.

        A call the journal already answered (the agent re-executes from its checkpoint
        after a load) is answered from it (:meth:`replayed`), and nothing else happens.
        A transactional call inside the replay window (:meth:`journal_only`) is not
        captured: if it is allowed, it is answered without a checkpoint."""
        if agent.replaying:
            answer = self.replayed(agent, call)
            if answer is not None:
                return answer
        captured = self.receive(agent, call, capture=not self.journal_only(agent, agent.tools.get(call.tool)))
        request = self.request(agent, call)
        if not isinstance(request, policies.ToolRequest):
            await self.commit(agent, call, self.snapshot(agent, call, captured), request)
            return request
        decision, usage = self.decide(agent, request)
        if isinstance(decision, Backoff):
            return await self.back_off(agent, call, captured, decision)
        return await self.route(agent, call, captured, decision, usage)

    def answer_inline(self, agent: LiveAgent, call: PendingCall) -> Answer | None:
        """Stages 1 to 9 for a call answered inside the guest's ``tool_call`` import, with no
        unwind and rewind of its instance (:attr:`host.sandbox.execution.Execution.inline_answer`),
        or None: the call unwinds and goes the usual way (:meth:`call`), which does it all.

        Only what :meth:`call` would do without waiting: an allowed transactional call in
        the journal-only window (:meth:`journal_only`: no checkpoint), decided by the plain
        precompiled decision (:meth:`decide_plain`), no credentials to lease, no replay under
        way, committed at once on the loop when the store can take it then
        (:meth:`AgentCommits.agent_now`). The same stages, the same functions, in the same
        order: its journal entry, audit events, counters and record are those of the usual
        way; its fuel is read at the import's entry on both ways
        (:attr:`~host.sandbox.execution.Execution.call_fuel`), so a guest re-executed from
        its checkpoint shows the journaled fuel at every call however each was answered.

        Anything else declines: another decision, a tool error in its arguments, a store
        that cannot commit now, an exception before the commit (what the stages changed in
        the agent is put back first, so the usual way starts from the same state and reports
        whatever it was). A store that fails the commit itself raises, out of the guest's
        call and its run, as the usual way's commit raises out of :meth:`serve`."""
        spec = agent.tools.get(call.tool)
        if (spec is None or agent.replaying or not self.journal_only(agent, spec)
                or agent.record.get("status") != "running" or not self.commits.can_commit_now()):
            return None
        grant = agent.bundle.policy.grants.get(call.tool)
        if grant is not None and grant.credentials:
            return None  # a lease is audited and may wait on a broker
        undo = _Undo(agent)
        try:
            self.receive(agent, call, capture=False)
            request = self.request(agent, call)
            decision = self.decide_plain(agent, request) if isinstance(request, policies.ToolRequest) else None
            prepared = self.prepare(agent, call, spec) if decision is not None else None
            if not isinstance(prepared, Prepared):
                undo()
                return None
            self.window(agent, call)
            write, events = self.transaction(agent, call, spec, prepared, None)
        except Exception:  # a host error before the commit: the usual way does it again and says why
            log.debug("call %s of agent %s not answered inline", call.seq, agent.agent_id, exc_info=True)
            undo()
            return None
        answer = self.commits.agent_now(agent, write, events)
        if answer is None:
            undo()
        else:
            self.answered_inline += 1
        return answer

    # 0 ----------------------------------------------------------------------------------
    def journal_only(self, agent: LiveAgent, spec: ToolSpec | None) -> bool:
        """Whether this call, if allowed, needs no checkpoint: the journal can replay it.

        A transactional tool's effect and its journaled answer commit together, so after a
        crash the guest re-executed from the last checkpoint is fed that answer, and the
        tool does not run again (:meth:`replayed`). What is saved is the state's capture,
        the checkpoint's encoding and its put: most of a ``kv.incr`` call. The price is a
        resume that re-executes up to the window: at most :attr:`checkpoint_every` calls
        and :data:`CHECKPOINT_EVERY_S` of the agent's time since its checkpoint. Only with
        a live instance (it goes on in place) and after the run's first checkpoint (a
        resumed agent that has none starts over, which must have done nothing outside).
        """
        if self.checkpoint_every <= 1 or spec is None or not spec.transactional:
            return False
        ex = agent.ex
        return (ex is not None and ex.live and int(agent.record.get("checkpoints") or 0) > 0
                and agent.since_checkpoint + 1 < self.checkpoint_every
                and time.monotonic() - agent.checkpointed_at < CHECKPOINT_EVERY_S)

    def replayed(self, agent: LiveAgent, call: PendingCall) -> Answer | None:
        """The journaled answer to a call the agent made before it was loaded, or None
        (the journal has none: the agent is live again from here, and stays live). Going
        live before the call its record last committed (:func:`_check_went_live`) is a
        journal entry lost on disk, :class:`RecordCorrupt`: never a recorded call run again.

        The guest re-executed from its checkpoint must make the very calls it made: the
        same tool, the same arguments, at the same fuel; anything else is
        :class:`ReplayDiverged`, never a different answer. Nothing is counted, audited,
        journaled or run again; the answer is checked against its audit record as at
        :meth:`recover`. The guest's log lines up to this call were written by the call's
        own commit, so the ones the re-execution logged again are dropped."""
        ex = agent.ex
        assert ex is not None
        with self.store.read() as txn:
            entry = txn.get_journal(agent.agent_id, call.seq)
            if entry is None:
                _check_went_live(agent, call)
                agent.replaying = False
                return None
            expected = {"tool": entry.get("tool"), "args": entry.get("args"), "fuel": entry.get("fuel")}
            got = {"tool": call.tool, "args": call.args, "fuel": ex.call_fuel}
            for what in ("tool", "args", "fuel"):
                if what == "fuel" and (expected["fuel"] is None or (isinstance(expected["fuel"], int)
                                                                     and ex.fuel_matches(expected["fuel"]))):
                    continue
                if expected[what] != got[what]:
                    raise ReplayDiverged(
                        f"agent {agent.agent_id} re-executed from its checkpoint made call {call.seq} with another "
                        f"{what} than its journal holds (expected {_brief(expected[what])}, got {_brief(got[what])}): "
                        "the bundle, the host or the stored state is not what ran; nothing was answered")
            if entry.get("state") != "done":
                raise ReplayDiverged(f"agent {agent.agent_id}: journal entry {call.seq} past its checkpoint is "
                                     f"{entry.get('state')!r}, not an answer; it cannot be replayed")
            answer: Answer = int(entry["status"]), str(entry["response"]).encode()
            _check_with_audit(txn, agent, call, answer)
        budgets.count_fuel(agent, ex.call_fuel)
        agent.unlogged = Pending()
        agent.logs.clear()
        agent.log_bytes = 0
        agent.since_checkpoint += 1
        return answer

    # 1 ----------------------------------------------------------------------------------
    @staticmethod
    def receive(agent: LiveAgent, call: PendingCall, capture: bool = True) -> Captured | None:
        """The guest stopped at a call: count it and capture its state (memory, globals),
        unless ``capture`` is False (a call :meth:`journal_only` may answer without a
        checkpoint; :meth:`snapshot` captures it if one is needed after all)."""
        ex = agent.ex
        assert ex is not None
        agent.stopped_at = time.perf_counter()
        agent.usage["suspensions"] = agent.usage.get("suspensions", 0) + 1
        budgets.count_fuel(agent, ex.call_fuel)  # at the import's entry (unwind and rewind are the host's)
        agent.record["last_progress"] = time.time()
        agent.captured = ex.capture() if capture else None
        agent.event("tool.requested", call_seq=call.seq, tool=call.tool, args_digest=audit.digest(call.args))
        return agent.captured

    # 2 ----------------------------------------------------------------------------------
    @staticmethod
    def request(agent: LiveAgent, call: PendingCall) -> policies.ToolRequest | Answer:
        """The call as the policy sees it, or the answer refusing arguments that are not JSON.

        The policy sees the arguments the tool will use (:func:`canonical_args`: a URL
        parsed and normalised once), never the text the guest happened to send.
        """
        try:
            args = canonical_args(agent.tools.get(call.tool), call.args)
            principal = agent.record.get("principal")
            return policies.ToolRequest(agent_id=agent.agent_id, tool=call.tool, args=args, call_seq=call.seq,
                                        principal=principal, agent_name=agent.bundle.name,
                                        run_id=f"{agent.run_started:.6f}", tenant=agent.record.get("tenant") or principal)
        except policies.NotJSONError as exc:
            return answers.invalid_args(call.tool, exc)

    # 3 ----------------------------------------------------------------------------------
    def decide(self, agent: LiveAgent,
               request: policies.ToolRequest) -> tuple[policies.Decision | Backoff, policies.Usage | None]:
        """The policy's decision, the usage it leaves (kept in the record; limits shared
        beyond the agent kept in the store by the accountant), audited. A plain call's
        (:func:`budgets.decide_plain`) leaves None: it counted, and nothing reads it after.

        A rate-limited call whose grant waits is a :class:`Backoff` instead, and counts
        nothing (neither a call nor a denial): it is decided, and counted, when it wakes."""
        now = time.time()
        plain = self.decide_plain(agent, request, now)
        if plain is not None:
            return plain, None
        decision, before, after = budgets.decide(agent, self.store, request, now)
        at = _backoff_until(agent, request.tool, decision, now)
        if at is not None:
            agent.event("tool.deferred", call_seq=request.call_seq, tool=request.tool, wake_at=at,
                        decision=decision.to_dict())
            return Backoff(at, decision), before
        budgets.keep(agent, after)
        agent.event(_DECISION_EVENT.get(decision.kind, "tool." + decision.kind),
                    call_seq=request.call_seq, tool=request.tool, decision=decision.to_dict())
        return decision, after

    @staticmethod
    def decide_plain(agent: LiveAgent, request: policies.ToolRequest, now: float | None = None) -> policies.Allow | None:
        """A plain call allowed and counted by its precompiled decision
        (:func:`budgets.decide_plain`), audited; None (nothing counted) when it is not one."""
        plain = budgets.decide_plain(agent, request, time.time() if now is None else now)
        if plain is not None:
            agent.event("tool.allowed", call_seq=request.call_seq, tool=request.tool, decision=plain.to_dict())
        return plain

    # 4 ----------------------------------------------------------------------------------
    async def route(self, agent: LiveAgent, call: PendingCall, captured: Captured | None,
                    decision: policies.Decision, usage: policies.Usage | None) -> Answer | Ended | Parked:
        """Act on the decision. Every branch writes checkpoint *K* before anything else happens."""
        if isinstance(decision, policies.Terminate):
            await self.commit(agent, call, self.snapshot(agent, call, captured), None)
            return Ended(Failed(decision.code, decision.reason), "terminated", decision.to_dict())
        if isinstance(decision, policies.RequireApproval):
            await self.park_for_approval(agent, call, captured, decision)
            return Parked()
        if isinstance(decision, policies.Deny):
            answer = answers.denial(decision)
            await self.commit(agent, call, self.snapshot(agent, call, captured), answer)
            return answer
        spec = agent.tools.get(call.tool)
        if spec is None:
            answer = answers.unknown_tool(call.tool)
            await self.commit(agent, call, self.snapshot(agent, call, captured), answer)
            return answer
        if spec.name == timers.SLEEP_TOOL:
            return await self.sleep(agent, call, spec, captured)
        if captured is None and spec.transactional:  # journal_only: no checkpoint, the journal replays it
            self.window(agent, call)
            ran = await self.execute(agent, call, spec, None)
        else:
            ran = await self.execute(agent, call, spec, self.snapshot(agent, call, captured))
        if isinstance(ran, Parked):  # the tool asks a person something (an MCP server's elicitation)
            return ran
        exceeded = self.check_budgets(agent, usage)
        if exceeded is not None:
            await self.commits.agent(agent)
            return Ended(Failed("budget_exceeded", exceeded.message), "terminated", exceeded.to_dict())
        return ran

    @staticmethod
    def window(agent: LiveAgent, call: PendingCall) -> None:
        """A call answered from the journal alone: the record names it as the agent's last
        call (what a resume must replay up to, :func:`_check_went_live`), and it counts in
        the replay window (:meth:`journal_only`)."""
        agent.record["pending"] = call.to_dict()
        agent.since_checkpoint += 1

    async def park_for_approval(self, agent: LiveAgent, call: PendingCall, captured: Captured | None,
                                decision: policies.RequireApproval) -> None:
        """Checkpoint and park: the request goes to the approvals queue, the instance is dropped."""
        request = {"agent_id": agent.agent_id, "name": agent.bundle.name, "call": call.to_dict(),
                   "reason": decision.reason, "rule": decision.rule, "requested_at": time.time(),
                   "principal": agent.record.get("principal")}
        cp = self.snapshot(agent, call, captured, status="waiting_approval")
        agent.record.update(approval={"reason": decision.reason, "rule": decision.rule}, owner=None)
        await self.commit(agent, call, cp, None,
                          also=lambda txn: txn.put_blob("approvals", agent.agent_id, audit.canonical(request)))
        self.guest.release(agent)

    async def park_for_input(self, agent: LiveAgent, call: PendingCall, question: dict[str, Any],
                             answered: list[dict[str, Any]]) -> Parked:
        """A tool's peer asks a person something mid-call (an MCP server's elicitation): the
        call was cut; park the agent as for an approval, the question in the approvals queue
        and the call's journal entry (``eliciting``, with the answers given so far), the
        instance dropped.  A person's answer (:func:`host.runtime.approvals.approve`) turns
        the entry ``approved`` and the call is made again at resume, the answers with it."""
        rule = f"[mcp.{question.get('server')}] elicitation"
        reason = f"{question.get('server')} asks: {question.get('message')}"
        request = {"agent_id": agent.agent_id, "name": agent.bundle.name, "call": call.to_dict(), "kind": "elicitation",
                   "reason": reason, "rule": rule, "question": question, "requested_at": time.time(),
                   "principal": agent.record.get("principal")}
        agent.record.update(status="waiting_approval", owner=None,
                            approval={"kind": "elicitation", "reason": reason, "rule": rule, "question": question})
        agent.event("mcp.elicitation_requested", call_seq=call.seq, tool=call.tool, server=question.get("server"),
                    index=question.get("index"), message=question.get("message"),
                    schema_digest=audit.digest(question.get("requested_schema")))
        entry = {**_journal_entry(agent, call, None), "state": "eliciting", "elicitations": answered[:int(
            question.get("index") or 0)], "asked": question}

        def write(txn: Any) -> None:
            txn.put_journal(agent.agent_id, call.seq, entry)
            txn.put_blob("approvals", agent.agent_id, audit.canonical(request))

        await self.commits.agent(agent, write)
        self.guest.release(agent)
        return Parked()

    # 4b: waits on a time --------------------------------------------------------------------
    async def sleep(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec, captured: Captured | None) -> Answer | Parked:
        """``timer.sleep``: its wake time journaled with checkpoint *K*, waited for, then answered."""
        now = time.time()
        try:
            at = spec.validate(canonical_args(spec, call.args)).wake_at(now)  # type: ignore[attr-defined]
        except ToolError as err:
            answer = answers.tool_error(err)
            await self.commit(agent, call, self.snapshot(agent, call, captured), answer)
            return answer
        cp = self.snapshot(agent, call, captured, status=_wait_status(at, now))
        if await self.wait_until(agent, call, at, "sleep", cp) is not None:
            return Parked()
        return await self.execute(agent, call, spec, None, {"wake_at": at})

    async def back_off(self, agent: LiveAgent, call: PendingCall, captured: Captured | None,
                       backoff: Backoff) -> Answer | Ended | Parked:
        """A call over a rate that waits: checkpoint *K* with its wake time, the wait, and the
        same call decided again (:meth:`redecide`): the tool runs only once it is allowed."""
        cp = self.snapshot(agent, call, captured, status=_wait_status(backoff.at, time.time()))
        if await self.wait_until(agent, call, backoff.at, "rate_limited", cp) is not None:
            return Parked()
        return await self.redecide(agent, call, agent.captured)

    async def redecide(self, agent: LiveAgent, call: PendingCall, captured: Captured | None) -> Answer | Ended | Parked:
        """Stages 2 to 10 again for a call that waited on a rate (its arguments were judged
        JSON the first time; the request is the same pure function of them)."""
        request = self.request(agent, call)
        assert isinstance(request, policies.ToolRequest)
        decision, usage = self.decide(agent, request)
        if isinstance(decision, Backoff):
            return await self.back_off(agent, call, captured, decision)
        return await self.route(agent, call, captured, decision, usage)

    async def wait_until(self, agent: LiveAgent, call: PendingCall, at: float, reason: str,
                         cp: Checkpoint | None) -> Parked | None:
        """Wait for ``at``: None once it has come, or Parked (the agent sleeps, hibernated).

        With ``cp`` (the first time), checkpoint *K* is written with the call's journal entry
        carrying ``wake_at``: a resume after a crash waits for the same time, not a new one.
        A wait under :data:`~host.runtime.timers.SHORT_WAIT_S` is held here; a longer one
        parks the agent ``sleeping``, its wake-up in the index, in that same commit."""
        state = "intent" if reason == "sleep" else "deferred"  # deferred: not yet allowed
        left = at - time.time()
        if left >= timers.SHORT_WAIT_S:
            agent.record.update(status=timers.SLEEPING, wake_at=at, wake_reason=reason, owner=None)
            agent.event("agent.sleeping", call_seq=call.seq, tool=call.tool, wake_at=at, reason=reason)

            def index(txn: Any) -> None:
                timers.put(txn, agent.agent_id, at, reason)

            if cp is not None:
                await self.commit(agent, call, cp, None, extra={"state": state, "wake_at": at}, also=index)
            else:
                await self.commits.agent(agent, index)
            self.guest.release(agent)
            return Parked()
        if agent.record.get("status") == timers.SLEEPING:  # the snapshot guessed long; time has passed since
            agent.record["status"] = "suspended"  # never "sleeping" without its wake-up in the index
        if cp is not None:
            await self.commit(agent, call, cp, None, extra={"state": state, "wake_at": at})
        if left > 0:
            await anyio.sleep(left)
        return None

    async def wake(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec,
                   entry: dict[str, Any]) -> Answer | Ended | Parked:
        """A resumed agent whose call waits on a time (its journal entry has ``wake_at``).

        Its wake-up is deleted in the commit that wakes it (status ``running``), never
        before; then what is left of the wait (none, unless the host stopped during a short
        one), then the sleep is answered or the rate-limited call decided again."""
        at = float(entry["wake_at"])
        if agent.record.get("status") == timers.SLEEPING:
            agent.record["status"] = "running"
            agent.record.pop("wake_at", None)
            reason = agent.record.pop("wake_reason", None)
            agent.event("agent.woke", call_seq=call.seq, tool=call.tool, wake_at=at, reason=reason,
                        late_s=round(max(0.0, time.time() - at), 6))
            await self.commits.agent(agent, lambda txn: timers.remove(txn, agent.agent_id, at))
        if await self.wait_until(agent, call, at, "sleep" if entry.get("state") == "intent" else "rate_limited",
                                 None) is not None:
            return Parked()
        if entry.get("state") == "deferred":
            assert agent.captured is not None
            return await self.redecide(agent, call, agent.captured)
        return await self.execute(agent, call, spec, None, {"wake_at": at})

    async def execute(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec, cp: Checkpoint | None,
                      extra: dict[str, Any] | None = None) -> Answer | Parked:
        """Stages 6 to 9 for an allowed call. ``cp`` is checkpoint *K*, or None when the call
        is run again after a crash or an approval (its checkpoint and intent are written).
        ``extra``: kept in its journaled answer (a sleep's ``wake_at``; the answers people
        gave to the call's questions, ``elicitations``, which the call made again is handed).
        Parked: the tool asked a person something (:meth:`park_for_input`)."""
        prepared = self.prepare(agent, call, spec, extra)
        if not isinstance(prepared, Prepared):  # its arguments are not what the tool takes
            answer = prepared
            await (self.commit(agent, call, cp, answer) if cp is not None else self.journal(agent, call, answer))
            return answer
        if spec.transactional:
            return await self.run_transactional(agent, call, spec, prepared, cp)
        if cp is not None:
            await self.commit(agent, call, cp, None)
        args, ctx, scrub = prepared
        try:
            answer = await self.run(agent, spec, args, ctx, scrub)
        except InputRequired as need:
            return await self.park_for_input(agent, call, scrub.value(need.question), ctx.elicited)
        await self.journal(agent, call, answer, extra)
        return answer

    def prepare(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec,
                extra: dict[str, Any] | None = None) -> Prepared | Answer:
        """The tool's arguments (validated, as the policy decided on them), its context with
        its leased secrets, and its scrubber; or the answer refusing arguments it cannot take."""
        try:
            args = spec.validate(canonical_args(spec, call.args))  # what the policy decided on
        except ToolError as err:
            return answers.tool_error(err)
        ctx = self.lease(agent, call)
        scrub = self.scrubber(agent, ctx)
        ctx.event = lambda kind, data: agent.event(kind, call_seq=call.seq, **scrub.value(data))
        ctx.nested = lambda tool, args: self.nested(agent, call, tool, args)
        ctx.elicited = [dict(e) for e in (extra or {}).get("elicitations") or ()]
        return Prepared(args, ctx, scrub)

    async def nested(self, agent: LiveAgent, call: PendingCall, tool: str, args: dict[str, Any]) -> Any:
        """Run another granted tool on behalf of call ``call`` (an MCP server's sampling
        request through ``llm.*``): decided by the agent's policy as if the agent had called
        it (audited, counted, its tokens paid from the agent's budget), run with its own
        leased credentials, its answer scrubbed.  A decision other than allow (a denial, an
        approval the agent cannot wait for inside another call, a limit) is a
        :class:`ToolError` the caller hands on; the call itself is journaled as part of
        ``call``'s answer, which is what a resumed agent replays."""
        spec = agent.tools.get(tool)
        if spec is None or tool not in agent.bundle.policy.grants:
            raise ToolError("denied", f"{tool} is not granted to this agent")
        inner = PendingCall(seq=call.seq, tool=tool, args=args)
        request = self.request(agent, inner)
        if not isinstance(request, policies.ToolRequest):
            raise ToolError("invalid_args", f"{tool}: the arguments are not JSON")
        decision, _ = self.decide(agent, request)
        if not isinstance(decision, policies.Allow):
            reason = getattr(decision, "reason", None) or "it was not allowed outright"
            raise ToolError("denied", f"{tool} for {call.tool}: {reason}")
        value_args = spec.validate(canonical_args(spec, args))
        ctx = self.lease(agent, inner)
        scrub = self.scrubber(agent, ctx)
        with scrubbing(scrub):
            value = await spec.func(value_args, ctx) if spec.is_async else await anyio.to_thread.run_sync(
                spec.func, value_args, ctx)
        agent.event("tool.nested", call_seq=call.seq, tool=tool, on_behalf_of=call.tool)
        return scrub.value(value)

    # 5 ----------------------------------------------------------------------------------
    @staticmethod
    def snapshot(agent: LiveAgent, call: PendingCall, captured: Captured | None, status: str = "suspended") -> Checkpoint:
        """Encode checkpoint *K* (a delta against the module's pristine image) and count it in
        the record. ``captured`` None: the guest's state is captured now (still stopped)."""
        if captured is None:
            assert agent.ex is not None
            captured = agent.captured = agent.ex.capture()
        rec = agent.record
        seq = int(rec.get("checkpoints", 0)) + 1
        u = agent.usage
        snap = Snapshot(agent_id=agent.agent_id, seq=seq, module_digest=agent.bundle.module_digest,
                        abi_version=abi.ABI_VERSION, memory=captured.memory, globals=captured.globals,
                        async_buf=captured.async_buf, entry=abi.ENTRY_EXPORT, pending=call.to_dict(),
                        usage={"fuel_used": u.get("fuel_used", 0), "tool_calls": u.get("tool_calls", 0)},
                        created_at=time.time())
        blob, chunks = encode_checkpoint(snap, pristine=agent.loaded.image)
        now = time.time()
        rec.update(checkpoints=seq, snapshot_bytes=int(rec.get("snapshot_bytes", 0)) + len(blob),
                   last_checkpoint_bytes=len(blob), pending=call.to_dict(), status=status, updated_at=now)
        agent.since_checkpoint = 0
        agent.checkpointed_at = time.monotonic()
        return Checkpoint(seq, blob, now, chunks)

    # 6 ----------------------------------------------------------------------------------
    async def commit(self, agent: LiveAgent, call: PendingCall, cp: Checkpoint, answer: Answer | None, *,
                     also: Any = None, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint *K*, the journal entry (intent, or the answer when known; ``extra``
        added to it: a wait's ``wake_at``), the audit: one commit."""
        entry = {**_journal_entry(agent, call, answer), **(extra or {})}
        if answer is not None:
            agent.event("tool.answered", **_answered(call, answer))
        agent.event("checkpoint", checkpoint=cp.seq, size=len(cp.blob))

        def write(txn: Any) -> None:
            _put_checkpoint(txn, agent, cp)
            txn.put_journal(agent.agent_id, call.seq, entry)
            if also is not None:
                also(txn)

        await self.commits.agent(agent, write)
        self.commits.observer.suspended(agent, time.perf_counter() - agent.stopped_at)

    # 7 ----------------------------------------------------------------------------------
    def lease(self, agent: LiveAgent, call: PendingCall) -> ToolContext:
        """The tool's view of the call, with the secrets its grant names leased for it.

        The secrets go to the tool, on the host side; the guest never sees them.
        """
        policy = agent.bundle.policy
        grant = policy.grants.get(call.tool)
        secrets: dict[str, str] = {}
        if grant is not None and grant.credentials and self.broker is not None:
            secrets = self.broker.secrets_for(agent.agent_id, call.tool, tuple(grant.credentials),
                                              on_event=lambda kind, data: agent.event(kind, **data))
        return ToolContext(agent_id=agent.agent_id, agent_name=agent.bundle.name, call_seq=call.seq,
                           kv_namespace=f"agent:{agent.agent_id}", principal=agent.record.get("principal"),
                           now=time.time, store=self.store,
                           report_tokens=lambda n, **detail: budgets.count_tokens(agent, call.seq, call.tool, n, **detail),
                           grant=grant, policy=policy, secrets=secrets, secret_hosts=bindings(secrets),
                           mcp_config=self.mcp_config)

    def scrubber(self, agent: LiveAgent, ctx: ToolContext) -> Scrubber:
        """What this call's answer is scrubbed of: its leased secrets, and every other
        credential the agent's policy names (a tool may hold more than its grant's)."""
        names = tuple(sorted({n for g in agent.bundle.policy.grants.values() for n in (g.credentials or ())}))
        return Scrubber(scrub_values(self.broker, agent.agent_id, names, ctx.secrets))

    @staticmethod
    def settle(spec: ToolSpec, scrub: Scrubber, value: Any = None, exc: Exception | None = None) -> Answer:
        """The answer to a tool's return value or exception, scrubbed: the one choke point
        between everything a tool hands back (results, error messages, exceptions, URLs,
        cut bodies, MCP answers) and the guest, its journal and the audit log."""
        if exc is None:
            answer = answers.result(value)
        elif isinstance(exc, ToolError):
            answer = answers.tool_error(exc)
        elif isinstance(exc, RecordCorrupt):  # it read a value changed on disk (ctx.store)
            answer = answers.record_corrupt(spec.name, exc)
        else:  # a tool bug must not take the host down; the operator's log keeps the details, scrubbed
            answer = answers.tool_crashed(spec.name, exc)
            log.warning("tool %s raised: %s", spec.name, scrub.text("".join(traceback.format_exception(exc))))
        return answers.scrubbed(answer, scrub)

    # 8 ----------------------------------------------------------------------------------
    async def run(self, agent: LiveAgent, spec: ToolSpec, args: Any, ctx: ToolContext,
                  scrub: Scrubber | None = None) -> Answer:
        """Run the tool; if it outlasts the warm wait, the waiting agent hibernates meanwhile.
        Raises :class:`InputRequired` when the tool's call was cut to ask a person something."""
        result: list[Answer] = []
        asked: list[InputRequired] = []
        done = anyio.Event()
        clean = scrub if scrub is not None else Scrubber(())

        async def call() -> None:
            try:
                with scrubbing(clean):  # the logs of the libraries it uses are scrubbed too
                    if spec.is_async:
                        value = await spec.func(args, ctx)
                    else:
                        value = await anyio.to_thread.run_sync(spec.func, args, ctx)
                result.append(self.settle(spec, clean, value))
            except InputRequired as need:
                asked.append(need)
            except Exception as exc:
                result.append(self.settle(spec, clean, exc=exc))
            finally:
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await self.guest.wait_warm(agent, done)
        if asked:
            raise asked[0]
        return result[0]

    async def run_transactional(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec, prepared: Prepared,
                                cp: Checkpoint | None) -> Answer:
        """Stages 6, 8 and 9 in one commit: the checkpoint (if any), the tool's effect on a
        write overlay (kept only if it succeeds), and its journaled answer."""
        write, events = self.transaction(agent, call, spec, prepared, cp)
        # Only the guest sees the answer before the agent's next durable commit: synced in the
        # background while the guest runs on (host.runtime.commits).
        result = await self.commits.agent(agent, write, events, sync="soon")
        assert result is not None
        if cp is not None:
            self.commits.observer.suspended(agent, time.perf_counter() - agent.stopped_at)
        return result

    def transaction(self, agent: LiveAgent, call: PendingCall, spec: ToolSpec, prepared: Prepared,
                    cp: Checkpoint | None) -> tuple[Callable[[Any], Answer], Callable[[Answer], Events]]:
        """A transactional call's commit: what it writes (checkpoint *K* if any, the tool's
        effect on a write overlay, kept only if it succeeds, the journaled answer) and the
        audit events its answer adds; committed awaited (:meth:`run_transactional`) or at
        once (:meth:`answer_inline`)."""
        args, ctx, scrub = prepared
        if cp is not None:
            agent.event("checkpoint", checkpoint=cp.seq, size=len(cp.blob))

        def write(txn: Any) -> Answer:
            if cp is not None:
                _put_checkpoint(txn, agent, cp)
            overlay = WriteOverlay(txn)
            try:
                answer = self.settle(spec, scrub, spec.func(args, ctx, overlay))
            except Exception as exc:
                answer = self.settle(spec, scrub, exc=exc)
            if answer[0] == 0:
                overlay.apply()
            txn.put_journal(agent.agent_id, call.seq, _journal_entry(agent, call, answer))
            return answer

        def events(answer: Answer) -> Events:
            return [("tool.answered", _answered(call, answer))]

        return write, events

    # 9 ----------------------------------------------------------------------------------
    async def journal(self, agent: LiveAgent, call: PendingCall, answer: Answer,
                      extra: dict[str, Any] | None = None) -> None:
        """The tool's answer, journaled (with its audit record) before the guest sees it."""
        entry = {**_journal_entry(agent, call, answer), **(extra or {})}
        agent.event("tool.answered", **_answered(call, answer))
        await self.commits.agent(agent, lambda txn: txn.put_journal(agent.agent_id, call.seq, entry))

    # 10 ---------------------------------------------------------------------------------
    @staticmethod
    def check_budgets(agent: LiveAgent, before: policies.Usage | None) -> policies.BudgetEvent | None:
        """A limit the call crossed (tokens an LLM call spent): the first that terminates."""
        return budgets.crossed(agent, before)

    # after a crash, an approval or an operator's decision -----------------------------------
    async def recover(self, agent: LiveAgent, call: PendingCall) -> Answer | Ended | Parked:
        """The answer to a resumed agent's pending call: recorded, approved, re-run when safe,
        waited for (a sleep, a rate-limit back-off: :meth:`wake`), or parked.

        The journal entry is read through its digest: one changed on disk raises
        RecordCorrupt (never a wrong answer replayed into the guest), and the caller's
        error boundary parks the agent ``corrupt`` (:meth:`host.runtime.host.Host._drive`).
        """
        with self.store.read() as txn:
            entry = txn.get_journal(agent.agent_id, call.seq)
            if entry is not None and entry.get("state") == "done":
                answer: Answer = int(entry["status"]), str(entry["response"]).encode()
                _check_with_audit(txn, agent, call, answer)
                return answer
        spec = agent.tools.get(call.tool)
        if spec is None:
            answer = answers.unknown_tool(call.tool)
            await self.journal(agent, call, answer)
            return answer
        if entry is not None and entry.get("wake_at") is not None and entry.get("state") in ("intent", "deferred"):
            return await self.wake(agent, call, spec, entry)
        if entry is not None and entry.get("state") == "approved" and spec.name == timers.SLEEP_TOOL:
            assert agent.captured is not None  # an approved sleep starts now: its time counts from here
            return await self.sleep(agent, call, spec, agent.captured)
        # The answers people gave to the call's questions (an MCP server's elicitations): the
        # call made again is handed them, and its journaled answer keeps them.
        given = {"elicitations": entry["elicitations"]} if entry is not None and entry.get("elicitations") else None
        if entry is not None and entry.get("state") == "approved":
            # A human approved it (or answered its question) and the tool has not started: run it, now, once.
            agent.record["status"] = "running"
            intent = {k: v for k, v in entry.items() if k != "asked"} | {"state": "intent", "t": time.time()}
            await self.commits.agent(agent, lambda txn: txn.put_journal(agent.agent_id, call.seq, intent))
            return await self.execute(agent, call, spec, None, given)
        if spec.idempotent or spec.transactional:
            # The call was decided and recorded as intent before the crash; safe to run again.
            return await self.execute(agent, call, spec, None, given)
        if spec.rerun_safe is not None and await spec.rerun_safe(self.lease(agent, call)):
            # Not idempotent by its grant, but its (trusted) server says it is read-only or idempotent.
            agent.event("tool.rerun", call_seq=call.seq, tool=call.tool,
                        reason="its server marks it read-only or idempotent, and the policy trusts its annotations")
            return await self.execute(agent, call, spec, None, given)
        agent.record["status"] = "in_doubt"
        agent.record["in_doubt"] = {
            "call": call.to_dict(),
            "reason": f"{call.tool} is not idempotent and the host stopped after starting it but before recording its result",
        }
        agent.event("agent.in_doubt", call_seq=call.seq, tool=call.tool)
        agent.record["owner"] = None
        await self.commits.agent(agent)
        return Parked()


def _wait_status(at: float, now: float) -> str:
    """The status checkpoint *K* of a wait records: ``sleeping`` when it will park."""
    return timers.SLEEPING if at - now >= timers.SHORT_WAIT_S else "suspended"


def _backoff_until(agent: LiveAgent, tool: str, decision: policies.Decision, now: float) -> float | None:
    """When a rate-limited call whose grant says ``on_limit = "wait"`` is decided again, or
    None: any other decision, or a wait past ``max_wait`` or the run's wall-clock budgets
    (then it is denied as under ``"deny"``). A denial that would end the agent for too many
    denials waits too: it is not a denial yet."""
    deny = decision.cause if isinstance(decision, policies.Terminate) else decision
    if not isinstance(deny, policies.Deny) or deny.code != "rate_limited" or deny.retry_after_s is None:
        return None
    policy = agent.bundle.policy
    grant = policy.grants.get(tool)
    if grant is None or grant.on_limit != "wait":
        return None
    at = now + deny.retry_after_s + timers.SETTLE_S
    b = policy.budgets
    caps = (now + grant.max_wait if grant.max_wait is not None else None,
            agent.run_started + b.wall_clock if b.wall_clock is not None else None,
            float(agent.record.get("created_at", now)) + b.wall_clock_total if b.wall_clock_total is not None else None)
    if any(cap is not None and at > cap for cap in caps):
        return None
    return at


def canonical_args(spec: ToolSpec | None, args: Any) -> Any:
    """The arguments as ``spec`` will use them: what the policy decides on and the tool gets.

    A pure function of the arguments, so the call run again after a crash or an approval
    gets exactly what was judged; the journal keeps the guest's own text (replay compares it).
    """
    if spec is None or spec.canonical is None:
        return args
    return spec.canonical(args)


def _put_checkpoint(txn: Any, agent: LiveAgent, cp: Checkpoint) -> None:
    """Write checkpoint *K* with its new chunks, and drop those the policy's retention lets go.

    Pruned checkpoints' chunks stay until ``torpor store compact`` reclaims what nothing
    names (other checkpoints, other agents and the journal share chunks).
    """
    txn.put_checkpoint(agent.agent_id, cp.seq, cp.blob, cp.created, cp.chunks or None)
    keep = agent.bundle.policy.retention.checkpoints
    if keep is not None and cp.seq > keep:
        txn.prune_checkpoints(agent.agent_id, cp.seq - keep + 1)


def _journal_entry(agent: LiveAgent, call: PendingCall, answer: Answer | None) -> dict[str, Any]:
    """The journal's record of a call: its intent, or its answer once known."""
    entry: dict[str, Any] = {"tool": call.tool, "args": call.args, "checkpoint": agent.record.get("checkpoints", 0),
                             "state": "intent", "fuel": agent.usage.get("fuel_used", 0), "t": time.time()}
    if answer is not None:
        entry.update(state="done", status=answer[0], response=answer[1].decode())
    return entry


def _check_with_audit(txn: Any, agent: LiveAgent, call: PendingCall, answer: Answer) -> None:
    """A recorded answer matches the digest the agent's audit chain holds for it, or
    RecordCorrupt: the journal's seal is a checksum anyone who writes the store can
    recompute, the audit chain is signed (see :func:`host.trust.audit.answered_digest`)."""
    expected = audit.answered_digest(txn, agent.agent_id, int(agent.record.get("audit_seq") or 0), call.seq)
    parent, depth = agent.record.get("parent"), 0
    while expected is None and isinstance(parent, dict) and depth < 64:  # a fork's earlier calls: its parent's chain
        rec = txn.get_agent(str(parent.get("agent_id")))
        if rec is None:
            break
        expected = audit.answered_digest(txn, rec["agent_id"], int(rec.get("audit_seq") or 0), call.seq)
        parent, depth = rec.get("parent"), depth + 1
    if expected is not None and expected != _answered(call, answer)["result_digest"]:
        label = f"journal entry {call.seq} of agent {agent.agent_id}"
        raise RecordCorrupt(f"{label} holds an answer whose digest differs from the one its audit record holds "
                            "(changed on disk; restore the store from a copy)", database="journal", key=label)


def _check_went_live(agent: LiveAgent, call: PendingCall) -> None:
    """A re-executed guest goes live at a call its journal has no entry for: RecordCorrupt
    if its record, committed with every call, says it had made that call already (the
    record's last call, ``pending``). Its entry was lost on disk past the checkpoint; the
    call ran, and must not run again (a ``kv.incr`` would count twice)."""
    last = (agent.record.get("pending") or {}).get("seq")
    if isinstance(last, int) and call.seq <= last:
        label = f"journal entry {call.seq} of agent {agent.agent_id}"
        raise RecordCorrupt(f"{label} is missing, but the agent's record says it made calls up to {last}: the entry "
                            "was lost on disk past the checkpoint; its call is not run again (restore the store "
                            "from a copy)", database="journal", key=label)


def _brief(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _answered(call: PendingCall, answer: Answer) -> dict[str, Any]:
    """The audit record of an answer: its status and a digest of what the guest was told."""
    return {"call_seq": call.seq, "tool": call.tool, "status": answer[0],
            "result_digest": audit.digest(answer[1].decode())}
