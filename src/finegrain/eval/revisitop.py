"""Loader for the Revisited Oxford/Paris (revisitop) ground-truth files.

The revisitop ground truth (Radenovic et al., CVPR 2018) is published as a
pickle holding a dict with

``imlist``
    database image names (without extension),
``qimlist``
    query image names,
``gnd``
    one dict per query with ``bbx`` (query box ``[x1, y1, x2, y2]``) and the
    ``easy``, ``hard`` and ``junk`` lists of indices into ``imlist``.

A JSON file with the same structure is accepted too.

Pickles are never loaded with plain :func:`pickle.load`: unpickling can run
arbitrary code (``os.system``, ``builtins.eval`` ...). They are read through
:class:`RestrictedUnpickler`, whose ``find_class`` only resolves the globals in
:data:`ALLOWED_GLOBALS`. The published files (``gnd_roxford5k.pkl``,
``gnd_rparis6k.pkl``) and the mini copy in ``shared/data`` contain only
built-in containers, strings, ints and floats and reference *no* global at
all, so the allow-list is empty and every global is refused.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "ALLOWED_GLOBALS",
    "BadGroundTruthError",
    "RestrictedUnpickler",
    "RevisitopGnd",
    "UnsafePickleError",
    "db_image_path",
    "find_gnd_file",
    "load_gnd",
    "query_image_path",
]

#: ``(module, name)`` pairs a ground-truth pickle may reference. The real
#: revisitop files reference none (checked with :mod:`pickletools`), so this is
#: empty: nothing beyond plain built-in data can be unpickled.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset()


#: Ground-truth files larger than this are refused unread (the published ones are under 300 KB).
MAX_GND_BYTES = 64 * 2**20
#: Pickle opcodes the loader reads at most (the published files have under 40,000).
MAX_PICKLE_OPS = 5_000_000
#: Values (containers, strings, numbers) the loaded ground truth may hold, counting each shared reference
#: every time it is reached: a small pickle that references one list from many places ("billion laughs")
#: would expand to far more than this when converted.
MAX_GND_VALUES = 5_000_000
#: Nesting depth of the ground truth (the real files: dict > list > dict > list).
MAX_GND_DEPTH = 16
# Opcodes that build sets or tuples, which the real files never use: a tuple or frozenset can be a dict key
# or set member, and hashing a deeply shared one takes exponential time inside a single opcode.
_REFUSED_OPS = frozenset({"EMPTY_SET", "ADDITEMS", "FROZENSET", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2",
                          "TUPLE3"})


class UnsafePickleError(ValueError):
    """Raised when a pickle references a global that is not allow-listed."""


class BadGroundTruthError(ValueError):
    """A ground-truth file that is truncated, oversized, self-referential or otherwise not plain data."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in :data:`ALLOWED_GLOBALS`.

    Every callable or class a pickle can invoke (``GLOBAL``, ``STACK_GLOBAL``,
    ``INST``, extension codes) is looked up through :meth:`find_class`, so
    refusing there prevents code execution during loading.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve ``module.name`` if allow-listed, else refuse.

        Parameters
        ----------
        module, name:
            The global the pickle references.

        Returns
        -------
        object
            The resolved global.

        Raises
        ------
        UnsafePickleError
            If ``(module, name)`` is not in :data:`ALLOWED_GLOBALS`.
        """
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        self.refuse(module, name)

    @staticmethod
    def refuse(module: str, name: str) -> NoReturn:
        """Raise the :class:`UnsafePickleError` for global ``module.name``."""
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: revisitop ground-truth "
            "files contain only plain lists, dicts, strings and numbers"
        )

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids (never used by ground-truth files)."""
        raise UnsafePickleError(f"refusing to unpickle persistent id {pid!r}")


@dataclass
class RevisitopGnd:
    """Revisited Oxford/Paris ground truth.

    Attributes
    ----------
    imlist:
        Database image names, without extension.
    qimlist:
        Query image names, without extension.
    gnd:
        One dict per query: ``bbx`` (list of 4 floats, or None), ``easy``,
        ``hard`` and ``junk`` (lists of int indices into ``imlist``).
    """

    imlist: list[str] = field(default_factory=list)
    qimlist: list[str] = field(default_factory=list)
    gnd: list[dict] = field(default_factory=list)


def _to_builtin(value: Any) -> Any:
    """Turn numpy arrays/scalars (anything with ``tolist``) into built-ins."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, str, bytes)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    return value


def _int_list(value: Any, what: str) -> list[int]:
    """Convert a sequence of indices to a list of plain ints."""
    if value is None:
        return []
    value = _to_builtin(value)
    if isinstance(value, (int, float)):
        value = [value]
    out = []
    for v in value:
        if isinstance(v, bool) or not float(v).is_integer():
            raise ValueError(f"{what}: non-integer index {v!r}")
        out.append(int(v))
    return out


def _bbx(value: Any) -> list[float] | None:
    """Convert a query box to a list of 4 floats (None stays None)."""
    if value is None:
        return None
    box = [float(v) for v in _to_builtin(value)]
    if len(box) != 4:
        raise ValueError(f"bbx must have 4 values, got {len(box)}")
    return box


def _parse(raw: Any, source: Path) -> RevisitopGnd:
    """Validate and normalize the raw dict read from ``source``."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a dict, got {type(raw).__name__}")
    missing = {"imlist", "qimlist", "gnd"} - set(raw)
    if missing:
        raise ValueError(f"{source}: missing keys {sorted(missing)}")
    imlist = [str(x) for x in _to_builtin(raw["imlist"])]
    qimlist = [str(x) for x in _to_builtin(raw["qimlist"])]
    entries = list(raw["gnd"])
    if len(entries) != len(qimlist):
        raise ValueError(f"{source}: {len(entries)} gnd entries for {len(qimlist)} queries")
    gnd = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: gnd[{i}] is not a dict")
        gnd.append(
            {
                "bbx": _bbx(entry.get("bbx")),
                **{k: _int_list(entry.get(k), f"{source}: gnd[{i}][{k!r}]") for k in ("easy", "hard", "junk")},
            }
        )
    return RevisitopGnd(imlist=imlist, qimlist=qimlist, gnd=gnd)


def load_gnd(path: str | Path) -> RevisitopGnd:
    """Load a revisitop ground-truth file (``.pkl`` or ``.json``).

    Parameters
    ----------
    path:
        The ``gnd_*.pkl`` or ``gnd_*.json`` file.

    Returns
    -------
    RevisitopGnd
        The ground truth with plain Python lists, ints and floats.

    Raises
    ------
    UnsafePickleError
        If a pickle references any global (it is never executed).
    ValueError
        If the suffix is unsupported or the content is malformed.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".pkl", ".json"):
        raise ValueError(f"{path}: unsupported ground-truth format {suffix!r} (expected .pkl or .json)")
    with open(path, "rb") as fh:
        data = fh.read(MAX_GND_BYTES + 1)
    if len(data) > MAX_GND_BYTES:
        raise BadGroundTruthError(f"{path}: larger than {MAX_GND_BYTES // 2**20} MiB; not a ground-truth file")
    try:
        if suffix == ".pkl":
            _scan_pickle(data, path)
            raw = RestrictedUnpickler(io.BytesIO(data)).load()
        else:
            raw = json.loads(data.decode("utf-8"))
        _check_plain_tree(raw, path)
    except (UnsafePickleError, BadGroundTruthError):
        raise
    except RecursionError:
        raise BadGroundTruthError(f"{path}: nested too deeply") from None
    except MemoryError:
        raise BadGroundTruthError(f"{path}: too large to load") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise BadGroundTruthError(f"{path}: not a readable ground-truth file ({type(exc).__name__}: {exc})") from None
    return _parse(raw, path)


def _scan_pickle(data: bytes, source: Path) -> None:
    """Read the opcodes without running them: refuse globals, sets, tuples, and more than MAX_PICKLE_OPS."""
    strings: deque[str] = deque(maxlen=2)  # STACK_GLOBAL takes its module and name from the last two strings
    for count, (op, arg, pos) in enumerate(pickletools.genops(data)):
        if count >= MAX_PICKLE_OPS:
            raise BadGroundTruthError(f"{source}: more than {MAX_PICKLE_OPS:,} pickle operations")
        if op.name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            module, name = str(arg).split(" ", 1) if op.name != "STACK_GLOBAL" else (tuple(strings) + ("?", "?"))[:2]
            if (module, name) not in ALLOWED_GLOBALS:
                RestrictedUnpickler.refuse(module, name)
        elif op.name in ("PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"):
            raise UnsafePickleError(f"refusing to unpickle {op.name} at byte {pos}: revisitop ground-truth files "
                                    "contain only plain lists, dicts, strings and numbers")
        elif op.name in _REFUSED_OPS:
            raise BadGroundTruthError(f"{source}: unexpected pickle opcode {op.name} at byte {pos} (ground truth "
                                      "holds only lists, dicts, strings and numbers)")
        if isinstance(arg, str):
            strings.append(arg)


def _check_plain_tree(raw: Any, source: Path) -> None:
    """Walk ``raw`` as the tree it expands to: refuse cycles, depth over MAX_GND_DEPTH, more than MAX_GND_VALUES."""
    stack: list[tuple[Any, int, frozenset[int]]] = [(raw, 0, frozenset())]
    seen = 0
    while stack:
        value, depth, path = stack.pop()
        seen += 1
        if seen > MAX_GND_VALUES:
            raise BadGroundTruthError(f"{source}: expands to more than {MAX_GND_VALUES:,} values (shared references "
                                      "repeated: a 'billion laughs' file?)")
        if isinstance(value, (list, dict)):
            if id(value) in path:
                raise BadGroundTruthError(f"{source}: a list or dict contains itself")
            if depth >= MAX_GND_DEPTH:
                raise BadGroundTruthError(f"{source}: nested more than {MAX_GND_DEPTH} levels deep")
            inner = path | {id(value)} if len(value) else path
            items = list(value.values()) if isinstance(value, dict) else value
            if len(items) > MAX_GND_VALUES:
                raise BadGroundTruthError(f"{source}: a container of {len(items):,} values")
            stack.extend((v, depth + 1, inner) for v in items)


def query_image_path(root: str | Path, name: str) -> Path:
    """Path of query image ``name``: ``root/jpg/<name>.jpg``.

    Parameters
    ----------
    root:
        Dataset folder (the one holding ``jpg/``).
    name:
        Entry of :attr:`RevisitopGnd.qimlist`.

    Returns
    -------
    pathlib.Path
    """
    return Path(root) / "jpg" / (name + ".jpg")


def db_image_path(root: str | Path, name: str) -> Path:
    """Path of database image ``name``: ``root/jpg/<name>.jpg``.

    Parameters
    ----------
    root:
        Dataset folder (the one holding ``jpg/``).
    name:
        Entry of :attr:`RevisitopGnd.imlist`.

    Returns
    -------
    pathlib.Path
    """
    return Path(root) / "jpg" / (name + ".jpg")


def find_gnd_file(data_dir: str | Path) -> Path:
    """The single ``gnd_*.pkl`` in ``data_dir`` (else the single ``gnd_*.json``).

    Parameters
    ----------
    data_dir:
        Folder to search (not recursive).

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the folder holds no ``gnd_*.pkl`` nor ``gnd_*.json``.
    ValueError
        If several files of the chosen kind match.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} is not a directory")
    for pattern in ("gnd_*.pkl", "gnd_*.json"):
        found = sorted(p for p in data_dir.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{data_dir}: several ground-truth files match {pattern}: {names}")
    raise FileNotFoundError(f"{data_dir}: no gnd_*.pkl or gnd_*.json ground-truth file")
