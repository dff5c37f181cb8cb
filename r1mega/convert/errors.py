"""The one exception type of checkpoint conversion.

Every problem a user can fix (unsupported architecture, missing/unexpected tensors, wrong
shapes, an output directory in the way) raises :class:`ConversionError` with a message
that names what is wrong, so the CLIs print it and exit 2 instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message says why."""


def name_list(names: Iterable[str], limit: int = 40) -> str:
    """``names`` one per line (sorted, the first ``limit``), for error messages."""
    names = sorted(names)
    shown = "\n".join(f"  {n}" for n in names[:limit])
    if len(names) > limit:
        shown += f"\n  ... and {len(names) - limit} more"
    return shown
