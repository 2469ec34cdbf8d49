"""JSON Schemas the host did not write, applied to values it did not write, in bounded time.

Schemas reach the host from untrusted places: a pushed bundle's input schema (checked
against an MCP caller's arguments on the server), an MCP server's tool schemas (checked
against a guest's arguments), a server's elicitation schema (checked against a person's
answer). Their ``pattern`` and ``patternProperties`` are regular expressions, and
jsonschema matches them with Python's backtracking ``re``, which holds the GIL: a pattern
such as ``^(a+)+$`` against 40 characters runs for hours and wedges the whole process,
every tenant's requests and agents with it (a regular-expression denial of service).

This module is the one place validators are made. Every regular expression a schema
holds is matched by the ``regex`` package instead, under one time budget per
validation (:data:`PATTERN_BUDGET_S`, shared by every match it makes); a validation
that runs out raises :class:`SchemaTooSlow`, which each caller reports as the schema
not being applicable, like any other broken schema. The patterns' syntax is ``re``'s
(``regex``'s VERSION0 is its compatible mode).
"""

from __future__ import annotations

import contextvars
import time
from typing import Any

import jsonschema
import jsonschema._keywords
import jsonschema._legacy_keywords
import jsonschema._utils
import jsonschema.exceptions
import jsonschema.validators
import regex

__all__ = ["PATTERN_BUDGET_S", "SchemaTooSlow", "check_schema", "errors", "validator"]

#: Seconds all the regular-expression matches of one validation may take together.
PATTERN_BUDGET_S = 0.25

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("torpor_schema_deadline", default=None)


class SchemaTooSlow(ValueError):
    """The schema's regular expressions took longer than the budget on this value."""


class _BoundedRe:
    """What jsonschema's keyword modules call as ``re``: ``search`` under the budget left."""

    def __getattr__(self, name: str) -> Any:  # anything but search: the real re's
        import re

        return getattr(re, name)

    @staticmethod
    def search(pattern: Any, string: Any, flags: int = 0) -> Any:
        deadline = _deadline.get()
        left = PATTERN_BUDGET_S if deadline is None else deadline - time.monotonic()
        if left <= 0:
            raise SchemaTooSlow(f"the schema's patterns took more than {PATTERN_BUDGET_S:g} s on this value")
        try:
            return regex.search(pattern, string, flags, timeout=left)
        except TimeoutError:
            raise SchemaTooSlow(f"the schema's pattern {str(pattern)[:80]!r} took more than "
                                f"{PATTERN_BUDGET_S:g} s on this value (a pattern that backtracks)") from None
        except regex.error as exc:  # re compiled it when the schema was checked; regex may differ
            raise SchemaTooSlow(f"the schema's pattern {str(pattern)[:80]!r} cannot be applied: {exc}") from None


# jsonschema's keywords (pattern, patternProperties, additionalProperties,
# unevaluatedProperties) call ``re.search`` through these modules' globals: the one seam.
for _module in (jsonschema._keywords, jsonschema._utils, jsonschema._legacy_keywords):
    _module.re = _BoundedRe()


def check_schema(schema: Any) -> Any:
    """The validator class for ``schema`` (its ``$schema``, or draft 2020-12) after checking
    the schema against its meta-schema (``jsonschema.exceptions.SchemaError`` if it is not
    one, or if it nests too deeply to check: a RecursionError is no answer to give a caller)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except RecursionError:  # the meta-schema check recurses per level: ~200 levels end the stack
        raise jsonschema.exceptions.SchemaError("the schema is nested too deeply to be checked") from None
    return cls


def validator(schema: Any, *, format_checker: Any = None) -> Any:
    """A validator of ``schema`` (not checked against its meta-schema: see :func:`check_schema`)."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=format_checker)


def errors(v: Any, value: Any) -> list[Any]:
    """Every way ``value`` fails validator ``v``, within the pattern budget (:class:`SchemaTooSlow`
    past it; other exceptions of a schema that cannot be applied, e.g. a ``$ref`` never
    fetched, propagate as jsonschema raises them)."""
    token = _deadline.set(time.monotonic() + PATTERN_BUDGET_S)
    try:
        return list(v.iter_errors(value))
    finally:
        _deadline.reset(token)
