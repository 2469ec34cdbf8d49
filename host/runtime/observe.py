"""The runtime's one seam for whoever watches it (a server's metrics): what happened, and how long it took.

The runtime tells one :class:`Observer` about the few moments an operator measures:

* ``spawned``: an agent's spawn is durable (record, input, identity), with how long it took;
* ``ran``: a guest segment ran, with the fuel it burnt and its time;
* ``suspended``: a guest stopped at a tool call and its checkpoint is durable, with the time
  from the stop to the end of that commit (what hibernating an agent costs);
* ``resumed``: :meth:`Host.resume` claimed an agent and restored it from its latest
  checkpoint (read, decode), with how long that took;
* ``committed``: one commit of an agent's step, with the audit events it sealed and how
  long the commit took as the agent waited for it.

What a tool call came to (ok, error, denied, waiting for a person), the tokens spent and
how an agent ended are not told one by one: they are read from the audit events of
``committed``, the records the runtime writes anyway, so each is counted at one choke
point (the commit) and the same way it is audited. No argument, input or output of an
agent is handed over beyond those events, whose values are digests and codes.

The default :data:`NOBODY` does nothing: when no one watches, each seam costs one call of
an empty method (well under a microsecond, at points that each cost tens of microseconds
or more). An observer must not change the agent it is shown, must be quick (it is called
on the event loop) and must not raise: an exception from it would end the agent's run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host.runtime.agent import LiveAgent

#: Audit events as one commit sealed them: (kind, data).
Events = Sequence[tuple[str, dict[str, Any]]]


class Observer:
    """Watches a :class:`~host.runtime.Host`; every method here does nothing (subclass what you need)."""

    def spawned(self, agent: LiveAgent, seconds: float) -> None:
        """An agent was spawned; ``seconds`` from the request to its durable record."""

    def ran(self, agent: LiveAgent, fuel: int, seconds: float) -> None:
        """A segment of the agent's guest code ran, burning ``fuel`` in ``seconds``."""

    def suspended(self, agent: LiveAgent, seconds: float) -> None:
        """The guest stopped at a tool call; ``seconds`` from the stop to its durable checkpoint."""

    def resumed(self, agent: LiveAgent, seconds: float) -> None:
        """The agent was claimed and restored from its latest checkpoint in ``seconds``."""

    def committed(self, agent: LiveAgent, events: Events, seconds: float) -> None:
        """A commit of the agent's step sealed ``events``; it took ``seconds`` (durable)."""


#: The observer of a host nobody watches.
NOBODY = Observer()


class _FanOut(Observer):
    """Tells each of its observers in turn (a server's metrics and the traces)."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def spawned(self, agent: LiveAgent, seconds: float) -> None:
        for o in self.observers:
            o.spawned(agent, seconds)

    def ran(self, agent: LiveAgent, fuel: int, seconds: float) -> None:
        for o in self.observers:
            o.ran(agent, fuel, seconds)

    def suspended(self, agent: LiveAgent, seconds: float) -> None:
        for o in self.observers:
            o.suspended(agent, seconds)

    def resumed(self, agent: LiveAgent, seconds: float) -> None:
        for o in self.observers:
            o.resumed(agent, seconds)

    def committed(self, agent: LiveAgent, events: Events, seconds: float) -> None:
        for o in self.observers:
            o.committed(agent, events, seconds)


def fan_out(*observers: Observer) -> Observer:
    """One observer telling all of ``observers`` (:data:`NOBODY` left out; one alone is itself)."""
    real = [o for o in observers if o is not NOBODY]
    if not real:
        return NOBODY
    return real[0] if len(real) == 1 else _FanOut(real)
