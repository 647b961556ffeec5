"""What an id a client sends can be, for the gateway to look it up at all.

Every id the gateway hands out (a trace, a response, a conversation, an item) is text that
PostgreSQL stores and, for a trace, part of a NATS subject. An id that could never have been
made is answered "not found" before any store is asked: PostgreSQL's text holds no NUL (the
driver refuses the query, which read as an outage), and a NATS subject's `.`, `*`, `>` or
white space would name other subjects (`evt.chat.*`: every trace's events).
"""

from __future__ import annotations

import os
import re

# `new_trace_id()` makes 32 hex digits; older or foreign traces (a test's "abc") stay readable.
_TRACE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MINTED = re.compile(r"[0-9a-f]{32}")

# A process's trace ids begin with its tag, new in each process, and so do the ids of its
# gateway instances (`Persistence.instance_id`): any gateway can tell whether the process that
# made an id may still be writing its row. The rest of an id is 96 random bits.
TAG_CHARS = 8
_tag = os.urandom(TAG_CHARS // 2).hex()


def _retag() -> None:
    global _tag
    _tag = os.urandom(TAG_CHARS // 2).hex()


os.register_at_fork(after_in_child=_retag)  # a forked child is another maker


def process_tag() -> str:
    return _tag


def new_trace_id() -> str:
    return _tag + os.urandom(12).hex()


def maker_tag(trace_id: str) -> str | None:
    """The tag of the process that made `trace_id`; None for an id of a shape no gateway makes."""
    return trace_id[:TAG_CHARS] if _MINTED.fullmatch(trace_id) else None


def storable(value: str) -> bool:
    """Whether an id can be looked up at all (PostgreSQL's text holds no NUL: no id has one)."""
    return "\x00" not in value


def is_trace_id(value: str) -> bool:
    """Whether `value` can name a trace: its row's key, and one token of its events' subject."""
    return _TRACE.fullmatch(value) is not None
