"""How long something is kept, in the words an error message gives a client."""

from __future__ import annotations

_UNITS = ((86400, "day"), (3600, "hour"), (60, "minute"))


def duration(seconds: float) -> str:
    """`seconds` in the largest unit it is a whole number of: "30 days", "1 hour", "90 seconds"."""
    for size, unit in _UNITS:
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds:g} second{'' if seconds == 1 else 's'}"
