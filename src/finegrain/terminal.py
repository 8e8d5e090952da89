"""Text from files (names, reasons, paths) made safe to print on a terminal.

A file name may hold escape sequences (``evil\\x1b]0;PWNED\\x07.jpg`` retitles
the terminal, ``\\x1b[2J`` clears it) or rich markup (``[red]``); printed raw,
a folder you index could rewrite your terminal. JSON output needs none of
this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re

from rich.text import Text

__all__ = ["escape_controls", "safe_text"]

# C0 and C1 controls, DEL, and the bidirectional overrides that reorder how a line reads.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: object) -> str:
    """``str(text)`` with every control character written as ``\\xNN`` / ``\\uNNNN``."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                       str(text))


def safe_text(text: object, style: str = "") -> Text:
    """A rich ``Text`` of ``text`` with controls escaped (a ``Text`` is never parsed for markup or emoji codes)."""
    return Text(escape_controls(text), style=style)
