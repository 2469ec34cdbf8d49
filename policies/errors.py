"""The one exception a policy file can raise, and the problems it carries.

A person fixing a policy wants every problem at once (not one per run), and for
each the file, the field as they would find it in the file, and what to write
instead.  So :class:`PolicyError` carries a tuple of :class:`PolicyIssue` and
renders all of them in its message; ``.source``, ``.field`` and ``.suggestion``
describe the first one for callers that only need one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file.

    ``field`` is the full dotted path in TOML notation (``budgets.tokns``,
    ``tools."kv.incr".args.key.alow``), or ``None`` when the problem is with the
    file as a whole (not TOML, unreadable).  ``message`` does not repeat the
    source; ``suggestion`` is the nearest valid key or value, when there is one.
    """

    message: str
    field: str | None = None
    suggestion: str | None = None
    source: str = "<string>"

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


class PolicyError(Exception):
    """A policy file that cannot be loaded.

    Raised by :func:`policies.load_policy` and :func:`policies.parse_policy`.
    The message lists every problem found, one per line, each naming the file
    and the field. ``code`` is the host's machine-readable name for it.
    """

    code = "invalid_policy"

    def __init__(
        self, issues: tuple[PolicyIssue, ...] | list[PolicyIssue], source: str | None = None
    ) -> None:
        items = tuple(issues)
        if not items:
            raise ValueError("PolicyError needs at least one issue")
        if source is not None:
            items = tuple(replace(i, source=source) for i in items)
        self.issues: tuple[PolicyIssue, ...] = items
        first = items[0]
        self.source: str = first.source
        self.field: str | None = first.field
        self.suggestion: str | None = first.suggestion
        super().__init__(self._render())

    def with_source(self, source: str) -> PolicyError:
        """The same problems, attributed to ``source`` (a file name)."""
        return PolicyError(self.issues, source=source)

    def _render(self) -> str:
        if len(self.issues) == 1:
            return str(self.issues[0])
        lines = [f"{self.source}: {len(self.issues)} problems:"]
        lines.extend(f"  - {i.message}" for i in self.issues)
        return "\n".join(lines)
