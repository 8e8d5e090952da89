"""What every index field's extractor does, and the registry of extractors.

An index stores several *fields* (``global``, ``segments``, ``objects``...),
each a set of vector rows owned by image ids (:class:`~finegrain.store.vectors.FieldRows`).
One :class:`FieldExtractor` computes the rows of one or more fields, in
three steps that every indexing engine (the local :class:`~finegrain.indexer.Indexer`
and the Ray engine) runs the same way:

1. :meth:`FieldExtractor.prepare`, once per file, in decode workers (threads,
   or Ray tasks): from the decoded image (:class:`Decoded`) to a picklable
   per-image payload (crops, masks, pixels ready for the network);
2. :meth:`FieldExtractor.encode`, on a batch of payloads, where the encoder
   runs (the main thread, or a Ray actor): one result per image;
3. :meth:`FieldExtractor.rows`: the results of one commit as field rows.

An extractor with learned state (the local-feature whitening) says so with
:attr:`FieldExtractor.needs_fit`; engines call :meth:`FieldExtractor.fit`
once, on the driver, before preparing anything, and the state lives under the
index folder, so workers that receive the (pickled) extractor find it there.

Extractors are registered under the catalog setting that enables them
(:func:`register`); :func:`build` turns an index's settings into the list of
extractors an engine runs. ``global`` is always on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from ..store.vectors import FieldRows

__all__ = ["Decoded", "FieldExtractor", "build", "register", "registered", "unregister"]


@dataclass
class Decoded:
    """One file as extractors' :meth:`FieldExtractor.prepare` sees it (in a decode worker).

    ``image`` is decoded once for every extractor, at a draft size of at least the
    largest :meth:`FieldExtractor.decode_side` (JPEGs); ``data`` holds the file's
    bytes for an extractor that needs its own decoding; ``width``/``height`` are
    the full upright size.
    """

    path: str
    data: bytes
    image: Image.Image
    width: int
    height: int


class FieldExtractor(ABC):
    """Computes the rows of one or more index fields (see the module docstring).

    Subclasses set :attr:`key` (the catalog setting that enables them, also the
    registry name) and :attr:`label` (how failures name them), and are built by
    :meth:`from_config` from that setting's value (``None`` for a field without
    settings) and the index folder. They must be picklable: the Ray engine
    ships them to its workers.
    """

    key: ClassVar[str] = ""
    label: ClassVar[str] = ""

    @classmethod
    @abstractmethod
    def from_config(cls, config: Any, root: Path) -> FieldExtractor:
        """The extractor for an index at ``root`` whose setting ``key`` is ``config``."""

    @abstractmethod
    def config_dict(self) -> Any:
        """The catalog setting this extractor was built from (what :meth:`from_config` reads back)."""

    @property
    @abstractmethod
    def fields(self) -> tuple[str, ...]:
        """Names of the fields :meth:`rows` writes."""

    def decode_side(self, encoder) -> int | None:
        """The shorter side the shared decode must keep at least (JPEG draft), or None to not care."""
        return None

    # learned state ---------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` must run before this run's :meth:`prepare` (e.g. no fitted state yet)."""
        return False

    def fit(self, paths: Sequence[str], show_progress: bool = False) -> None:  # noqa: B027 # optional hook
        """Learn this extractor's state from ``paths`` (the files about to be indexed) and save it."""

    # the three steps -------------------------------------------------------
    @abstractmethod
    def prepare(self, decoded: Decoded, encoder) -> Any:
        """One image's picklable payload for :meth:`encode` (runs in decode workers, concurrently)."""

    @abstractmethod
    def encode(self, encoder, payloads: list[Any]) -> list[Any]:
        """One result per payload, in order; batched where the encoder runs."""

    @abstractmethod
    def rows(self, results: list[Any], owners: np.ndarray) -> dict[str, FieldRows]:
        """Field rows of one commit: ``results[i]`` belongs to the image ``owners[i]``."""


_REGISTRY: dict[str, type[FieldExtractor]] = {}
_ALWAYS: set[str] = set()


def register(cls: type[FieldExtractor], always: bool = False) -> type[FieldExtractor]:
    """Register ``cls`` under ``cls.key`` (the catalog setting that enables it; ``always``: on in every index)."""
    if not cls.key:
        raise ValueError(f"{cls.__name__} has no key")
    _REGISTRY[cls.key] = cls
    if always:
        _ALWAYS.add(cls.key)
    else:
        _ALWAYS.discard(cls.key)
    return cls


def registered() -> dict[str, type[FieldExtractor]]:
    """Registered extractor classes by setting key, in registration order."""
    return dict(_REGISTRY)


def unregister(key: str) -> None:
    """Forget the extractor registered under ``key`` (tests)."""
    _REGISTRY.pop(key, None)
    _ALWAYS.discard(key)


def build(settings: Mapping[str, Any] | Callable[[str], Any], root: Path) -> list[FieldExtractor]:
    """The extractors an index at ``root`` runs: ``settings`` maps catalog keys to values (or reads one key)."""
    get = settings if callable(settings) else settings.get
    out: list[FieldExtractor] = []
    owner: dict[str, str] = {}
    for key, cls in _REGISTRY.items():
        value = get(key)
        if value is not None or key in _ALWAYS:
            ex = cls.from_config(value, Path(root))
            for f in ex.fields:  # two extractors writing one field would mix their rows
                if f in owner:
                    raise ValueError(f"field {f!r} is written by both the {owner[f]!r} and the {key!r} extractors")
                owner[f] = key
            out.append(ex)
    return out
