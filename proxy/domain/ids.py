"""What an id a client sends can be, for the gateway to look it up at all.

Every id the gateway hands out (a trace, a response, a conversation, an item) is text that
PostgreSQL stores and, for a trace, part of a NATS subject. An id that could never have been
made is answered "not found" before any store is asked: PostgreSQL's text holds no NUL (the
driver refuses the query, which read as an outage), and a NATS subject's `.`, `*`, `>` or
white space would name other subjects (`evt.chat.*`: every trace's events).
"""

from __future__ import annotations

import re

# `new_trace_id()` makes 32 hex digits; older or foreign traces (a test's "abc") stay readable.
_TRACE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def storable(value: str) -> bool:
    """Whether an id can be looked up at all (PostgreSQL's text holds no NUL: no id has one)."""
    return "\x00" not in value


def is_trace_id(value: str) -> bool:
    """Whether `value` can name a trace: its row's key, and one token of its events' subject."""
    return _TRACE.fullmatch(value) is not None
