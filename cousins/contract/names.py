"""The one rule for every name that becomes part of a path or a query: run ids, models, cousins.

ASCII letters, digits, '-', '_' and '.', not starting with '.', 1 to 200 characters; the whole
string must match (no trailing newline). The config refuses other names before any work starts,
and the query side refuses them in requests, so a run that was written can always be queried.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$"  # anchored for validators that search (pydantic)
NAME_RULE = "letters, digits, '-', '_' and '.' (ASCII), not starting with '.', at most 200 characters"
_NAME = re.compile(NAME_PATTERN)


def is_name(value: object) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None  # fullmatch: "$" alone lets "x\n" in
