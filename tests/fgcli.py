"""The `finegrain` command run in-process, answering like ``subprocess.run(..., capture_output=True, text=True)``.

The command line is parsed and run by the same click/typer code as ``python -m finegrain``; only the
interpreter start and model loading are shared between calls (about 5 s each). Tests that need a real
process (signals, kills, a fresh interpreter) keep using ``subprocess``. An exception escaping the
command is written to ``stderr`` as the traceback a real process would print, so a test asserting
``"Traceback" not in stderr`` can still fail.
"""

from __future__ import annotations

import subprocess
import traceback

from typer.testing import CliRunner


def fg(*args: object, env: dict[str, str] | None = None, **_ignored: object) -> subprocess.CompletedProcess[str]:
    """Run ``finegrain ARGS`` in this process (``COLUMNS=400`` like the subprocess helpers)."""
    from finegrain import cli

    for console in (cli.out, cli.err):  # made at import, before COLUMNS below was set
        console.width = 400
    app = cli.app
    argv = [str(a) for a in args]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "400", **(env or {})}, catch_exceptions=True)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exc = result.exception
        stderr += "Traceback (most recent call last):\n" + "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__))
    return subprocess.CompletedProcess(["finegrain", *argv], result.exit_code, result.stdout, stderr)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The one ``error: ...`` line a refused command printed on stderr, after checking its exit code."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]
