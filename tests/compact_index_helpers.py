"""Set-up shared by the compact-storage tests: a per-test copy of a module's index, a compress killed mid-way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.compress import storage
from finegrain.index import Index
from finegrain.store.writer import Writer

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


def minmax_codec(x: np.ndarray, quantize: str) -> storage.Codec:
    """A codec for rows like ``x`` without projection: float16, or int8 over each dimension's range in 254 steps."""
    lo, hi = x.min(0), x.max(0)
    scale = ((hi - lo) / 254).astype(np.float32) if quantize == "int8" else None
    offset = ((hi + lo) / 2).astype(np.float32) if quantize == "int8" else None
    return storage.Codec(None, scale, offset, quantize)


def _killed(*args, **kwargs):
    raise RuntimeError("killed")


@contextmanager
def crash_before_catalog_commit() -> Iterator[None]:
    """In-process: the write inside the block must fail where the catalog transaction would start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Writer, "replace_fields", _killed)
        with pytest.raises(RuntimeError, match="killed"):
            yield


def assert_compress_usage_error(idx: Index, args: list[str], message: str) -> None:
    """`finegrain compress ARGS` on ``idx`` exits 2 with ``message`` (no traceback) and changes no storage."""
    result = CliRunner().invoke(app, ["compress", "--index", str(idx.path), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert idx.info()["storage"] is None


def kill_before_catalog_commit(path: Path, call: str) -> None:
    """Run ``Index.open(path).<call>`` (e.g. ``compress(None, None, field='global', quantize='int8')``) in a child
    killed before its catalog commit; fails unless the kill is what ended it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILLED_SCRIPT.format(call=call), str(path)], env=env, timeout=300)
    assert proc.returncode == -9, proc.returncode
