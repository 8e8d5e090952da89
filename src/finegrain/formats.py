"""Pipe-friendly output of search hits: ``finegrain search --format jsonl|paths``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import TextIO

FORMATS = ("table", "jsonl", "paths")


def print_hits(hits: Iterable, fmt: str, stream: TextIO | None = None) -> None:
    """Write ``hits`` (objects with ``as_dict()`` and ``path``) as JSON Lines or one path per line."""
    stream = stream or sys.stdout
    if fmt == "jsonl":
        for h in hits:
            stream.write(json.dumps(h.as_dict(), ensure_ascii=False) + "\n")
    elif fmt == "paths":
        for h in hits:
            # Raw paths (for `xargs -d '\n'`); a newline inside a name would split it, so it is written as backslash-n.
            stream.write(h.path.replace("\n", "\\n") + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    stream.flush()
