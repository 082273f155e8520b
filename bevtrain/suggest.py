"""The one did-you-mean lookup behind every "unknown name" message (flags, presets, classes, layers)."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a mistyped ``name``, or None when nothing is close enough to suggest."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return close[0] if close else None
