"""The fleet's work queue: which agent needs driving, handed to one host at a time.

Why a queue beside the store: in a fleet any host's gateway accepts a run, and any host's
answer to an approval, a tool's result, a due timer or a back-off that ended wakes an agent;
the host that heard of it is not necessarily the one with room to drive it, nor alive a
second later. JetStream does this already, so the fleet uses it rather than a home-made
one: a stream with WorkQueue retention (a message lives until a host acknowledges it) and
one durable pull consumer shared by every host, with explicit acks, an ``ack_wait`` after
which a message nobody acknowledged is delivered again (to any host), and ``max_deliver``.

A message says only "agent X may need driving" (``kind``: ``run`` for a new run, ``wake``
for a wake-up, ``orphan`` for an agent whose host's lease expired): what to do is read from
the store when it is taken. So a message delivered twice, or two messages for one agent,
start nothing twice: the host that takes one claims the agent in the store first (one
commit decides between hosts, ``host.runtime.lifecycle``), and an agent that is finished,
parked, asleep before its time, or driven under another live lease, is acknowledged and left.
A message id per event (``work_id``: the run's agent id, a decision's, a timer's time)
makes a publish that two hosts make of the same event, or a retry of one, a single message
(JetStream's duplicate window).

A host keeps what it took unacknowledged while it drives the agent, says it is still at
it (``Work.in_progress``) well within ``ack_wait``, and acknowledges once the agent ended or
parked. A host that dies holding a message has it delivered again after ``ack_wait``,
to a host that resumes the agent from its last commit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

from .errors import StoreCorrupt
from .nats_bridge import NatsBridge, WorkMessage

__all__ = ["DURABLE", "KINDS", "Work", "WorkQueue"]

#: What a work message may say of its agent.
KINDS = frozenset({"run", "wake", "orphan"})
#: The one consumer every host pulls from (so each message goes to one host at a time).
DURABLE = "hosts"

Kind = Literal["run", "wake", "orphan"]


@dataclass(frozen=True, slots=True)
class Work:
    """A work message a host took: which agent, why, and how many times it was delivered."""

    kind: str
    agent_id: str
    work_id: str
    deliveries: int
    message: WorkMessage


class WorkQueue:
    """The work queue of the fleet store ``stream`` (``<stream>_work``), on the store's connection."""

    def __init__(self, bridge: NatsBridge, stream: str, replicas: int, *, ack_wait: float = 10.0,
                 max_deliver: int = 50) -> None:
        if not 0.5 <= ack_wait <= 3600:
            raise ValueError(f"ack_wait is 0.5 to 3600 seconds, got {ack_wait!r}")
        self._bridge = bridge
        self.name = f"{stream}_work"
        self.subject = f"{stream}_work.agents"
        self.max_deliver = max_deliver
        #: The consumer's ack wait: this host's, or the first host's when the queue existed already
        #: (a host says it is still at it within a third of it).
        self.ack_wait = bridge.ensure_work_queue(self.name, self.subject, replicas, durable=DURABLE,
                                                 ack_wait=ack_wait, max_deliver=max_deliver)

    def publish(self, kind: Kind, agent_id: str, work_id: str) -> int:
        """Say that ``agent_id`` may need driving; once per ``work_id`` (within two minutes).
        Its sequence (0 when the same id was being published at that moment, by another host)."""
        if kind not in KINDS:
            raise ValueError(f"a work message is one of {sorted(KINDS)}, got {kind!r}")
        body = json.dumps({"kind": kind, "agent_id": agent_id, "work_id": work_id}).encode()
        return self._bridge.publish_work(self.subject, body, msg_id=work_id)

    def pull(self, batch: int, wait: float) -> list[Work]:
        """Take up to ``batch`` messages (waiting at most ``wait`` s for one); a message that is
        not a work message is terminated (never delivered again) and left out."""
        out = []
        for m in self._bridge.fetch_work(self.name, DURABLE, batch, wait):
            try:
                body = json.loads(m.data)
                kind, agent_id, work_id = body["kind"], body["agent_id"], body["work_id"]
                if kind not in KINDS or not isinstance(agent_id, str) or not agent_id:
                    raise ValueError(f"kind {kind!r}, agent {agent_id!r}")
            except (ValueError, KeyError, TypeError) as exc:
                self._bridge.work_reply(m, "term")
                err = StoreCorrupt(f"work message {m.seq} of {self.name} is not one: {exc}")
                logging.getLogger("torpor.store.nats").warning("%s (dropped)", err)
                continue
            out.append(Work(str(kind), agent_id, str(work_id), m.deliveries, m))
        return out

    def ack(self, work: Work) -> None:
        """Done with it (the agent ended, parked, or is not this host's to drive): never again."""
        self._bridge.work_reply(work.message, "ack")

    def nak(self, work: Work, delay: float | None = None) -> None:
        """Not done: deliver it again (to any host), after ``delay`` seconds."""
        self._bridge.work_reply(work.message, "nak", delay)

    def in_progress(self, work: Work) -> None:
        """Still driving it: its ``ack_wait`` starts again."""
        self._bridge.work_reply(work.message, "progress")

    def state(self) -> dict[str, int]:
        """Messages waiting, taken and not acknowledged, delivered again (``torpor fleet status``)."""
        return self._bridge.work_state(self.name, DURABLE)
