"""What a request to the query (`cousins.query.runs`, `.drift`, `.prompt`) may ask, and the errors a
query answers with: the pattern every name that becomes part of a path (run id, cousin, model) must
match, the size limits on text values and on pages (`limit`, `offset`), the checkers that refuse
anything outside them, and the error classes a query raises, each carrying the HTTP status the query
service (services/) gives it: `BadInput` 422 (the request itself is invalid), `NotFound` 404 (no
such committed run, prompt or cousin), and their base `QueryError` 422. It imports none of those
modules; they and every caller import these names from here; the name rule itself is
`cousins.contract.names`'.
"""

from __future__ import annotations

import math
from typing import Any

# --- limits ----------------------------------------------------------------------------------------

from cousins.contract.names import NAME_PATTERN, NAME_RULE, is_name  # noqa: E402,F401 - the one name rule
MAX_TEXT = 500  # category and prompt id values (compared as values, never used as paths)
DEFAULT_LIMIT, MAX_LIMIT = 50, 1000
MAX_OFFSET = 100_000  # deeper pages: narrow the filter (a cousin, a category) instead


# --- errors ----------------------------------------------------------------------------------------


class QueryError(Exception):
    """A request that cannot be answered; `status` is the HTTP status the service gives it."""

    status = 422


class BadInput(QueryError, ValueError):
    status = 422


class NotFound(QueryError, LookupError):
    status = 404


class Unavailable(QueryError):
    """The storage root itself is gone (an unmounted volume, a deleted bucket prefix): not an
    empty store, and not a missing run."""

    status = 503


class Damaged(QueryError):
    """Stored data of a committed run that cannot be read (a truncated or corrupted file): the
    service's fault to report, not the request's; the message names the run and what is damaged."""

    status = 500


# --- checkers --------------------------------------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    """`value` if it is a safe name (letters, digits, '-', '_', '.', not starting with '.');
    anything that could name another path, an absolute path or a URL is refused."""
    if not is_name(value):
        raise BadInput(f"invalid {what} {repr(value)[:80]}: use {NAME_RULE}")
    return value


def check_text(value: str | None, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > MAX_TEXT):
        raise BadInput(f"invalid {what}: give 1 to {MAX_TEXT} characters")
    return value


def check_number(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"invalid {what} {value!r}: give a finite number")
    return float(value)
