"""Every option a CLI command declares is read by that command: an option pasted into the wrong command
is accepted and silently does nothing, which this catches."""
import ast
from pathlib import Path

import finegrain.cli

CLI = Path(finegrain.cli.__file__)


def _commands(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute) and d.func.attr == "command"
                for d in node.decorator_list):
            yield node


def test_every_declared_option_is_used():
    tree = ast.parse(CLI.read_text())
    unused = []
    commands = list(_commands(tree))
    assert len(commands) > 10  # the walk found the commands
    for fn in commands:
        names = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        read = {n.id for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
        unused += [f"{fn.name}({name})" for name in sorted(names - read)]
    assert not unused, f"options declared but never read: {unused}"
