"""Set-up shared by the compact-storage tests: a per-test copy of a module's index, a compress killed mid-way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from finegrain.index import Index

#: A child process that runs ``Index.open(path).<call>`` and is SIGKILLed (writer lock held) at the step before
#: the catalog transaction: the new storage files and chunks are written, the catalog does not name them yet.
KILLED_SCRIPT = """\
import os, signal, sys
from finegrain.index import Index
from finegrain.store.writer import Writer
Writer.replace_fields = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
Index.open(sys.argv[1]).{call}
"""


@contextmanager
def opened_copy(base: Path, path: Path) -> Iterator[Index]:
    """A copy of the index at ``base`` (built once per module) at ``path``, open for one test, closed after it."""
    shutil.copytree(base, path)
    idx = Index.open(path)
    try:
        yield idx
    finally:
        idx.close()


def kill_before_catalog_commit(path: Path, call: str) -> None:
    """Run ``Index.open(path).<call>`` (e.g. ``compress(None, None, field='global', quantize='int8')``) in a child
    killed before its catalog commit; fails unless the kill is what ended it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SCRIPT.format(call=call), str(path)], env=env, timeout=300)
    assert proc.returncode == -9, proc.returncode
