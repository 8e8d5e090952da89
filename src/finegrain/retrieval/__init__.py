"""Retrieval: every search mode, behind one registry (timm-style: ``get``, ``modes``, ``register``).

The registry is the only list of modes: :class:`~finegrain.index.Index`,
:mod:`~finegrain.explain`, shard sets, the HTTP service (its schema and the
page's mode selector) and the CLI (its help) all read it. Adding a mode
family is one module with a :class:`Retriever` subclass plus one
:func:`register` call::

    from finegrain import retrieval

    class MyRetriever(retrieval.Retriever):
        name = "mine"
        modes = ("my-mode",)
        def search(self, snapshot, mode, query, k, params):
            ...
            return retrieval.SearchResponse(hits, mode)

    retrieval.register(MyRetriever())

:func:`search` is the one entry point: it validates the mode, the query kind,
``k`` and the options (before any model runs), then asks the retriever.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..store import pages
from .auto import AUTO
from .base import (
    IMAGE,
    MAX_K,
    MAX_QUERY_CHARS,
    TEXT,
    ModeMismatch,
    NoParams,
    Params,
    Query,
    Retriever,
    SearchResponse,
    SearchResult,
    SearchStats,
    Term,
    check_k,
    check_text,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..explain import Explanation
    from ..store.snapshot import Snapshot

__all__ = ["Query", "SearchResponse", "SearchResult", "SearchStats", "Params", "NoParams", "Retriever", "register",
           "unregister", "get", "modes", "available", "search", "explain", "prepare", "check_k", "check_text", "MAX_K",
           "MAX_QUERY_CHARS", "TEXT", "IMAGE", "resolve", "resolve_mode", "AUTO", "Term", "ModeMismatch"]

_REGISTRY: dict[str, Retriever] = {}  # mode -> retriever, in registration order
_LOCK = threading.Lock()
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Register the four built-in families on first use (not as an import side effect of other modules)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    with _LOCK:
        if _BUILTINS_LOADED:
            return
        from .auto import AutoRetriever
        from .dense import DenseRetriever
        from .local import LocalRetriever
        from .multivector import MultiVectorRetriever
        from .objects import ObjectRetriever

        for retriever in (AutoRetriever(), DenseRetriever(), MultiVectorRetriever(), LocalRetriever(),
                          ObjectRetriever()):
            for mode in retriever.modes:
                _REGISTRY.setdefault(mode, retriever)
        _BUILTINS_LOADED = True


def register(retriever: Retriever, replace: bool = False) -> Retriever:
    """Add a retriever's modes to the registry; a mode name already taken raises unless ``replace``."""
    _load_builtins()
    if not retriever.modes:
        raise ValueError(f"retriever {retriever.name!r} declares no modes")
    with _LOCK:
        taken = [m for m in retriever.modes if m in _REGISTRY and _REGISTRY[m] is not retriever]
        if taken and not replace:
            raise ValueError(f"search mode(s) {', '.join(taken)} already registered "
                             f"(by {', '.join(sorted({_REGISTRY[m].name for m in taken}))})")
        for mode in retriever.modes:
            _REGISTRY[mode] = retriever
    return retriever


def unregister(retriever: Retriever) -> None:
    """Remove a retriever's modes (tests, plug-ins being unloaded)."""
    with _LOCK:
        for mode in retriever.modes:
            if _REGISTRY.get(mode) is retriever:
                del _REGISTRY[mode]


def modes() -> list[str]:
    """Every registered mode, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get(mode: str) -> Retriever:
    """The retriever answering ``mode``; ``ValueError`` naming the known modes otherwise."""
    _load_builtins()
    try:
        return _REGISTRY[mode]
    except (KeyError, TypeError):
        raise ValueError(f"unknown search mode {mode!r}; available: {', '.join(_REGISTRY)}") from None


def available(snapshot: Snapshot) -> list[str]:
    """The modes this index state supports (given the fields it stores)."""
    return [m for m in modes() if _REGISTRY[m].missing(snapshot, m) is None]


def describe() -> Mapping[str, str]:
    """One line per mode (for help texts and the service's schema)."""
    return {m: _REGISTRY[m].descriptions.get(m, _REGISTRY[m].name) for m in modes()}


def resolve_mode(snapshot: Snapshot, mode: str, query: Query) -> str:
    """The mode that runs: ``mode`` itself, or for ``auto`` the one its policy picks (:mod:`.auto`)."""
    if mode != AUTO:
        return mode
    from .auto import choose

    return choose(available(snapshot), query)


def resolve(snapshot: Snapshot, mode: str, query: Query, k: Any, options: Mapping[str, Any] | None
            ) -> tuple[Retriever, int, Params]:
    """Validate a search before any work: the mode exists and runs on this index, accepts the query, k and options."""
    retriever = get(mode)
    k = check_k(k)
    accepted = retriever.accepts(mode)
    if not query.kinds <= accepted:
        what = {IMAGE: "an image query (image=..., optional bbox)", TEXT: "a text query (text=...)"}
        raise ModeMismatch(f"search mode {mode!r} takes {' or '.join(what[k] for k in sorted(accepted))}, "
                         f"not a {query.kind} query")
    if query.combined and not retriever.combines_terms:
        able = [m for m in modes() if _REGISTRY[m].combines_terms]
        raise ModeMismatch(f"search mode {mode!r} takes one plain query and cannot combine terms (several terms, "
                         f"weights, text with an image, negatives); modes that can: {', '.join(able)}")
    why = retriever.missing(snapshot, mode)
    if why:
        raise ModeMismatch(why)
    return retriever, k, retriever.params(snapshot, mode, options)


def _resolve_auto(snapshot: Snapshot, mode: str, query: Query, k: Any, options: Mapping[str, Any] | None
                  ) -> tuple[str, Retriever, int, Params]:
    k = check_k(k)  # a bad k is the caller's whatever the mode
    ran = resolve_mode(snapshot, mode, query)
    try:
        return (ran, *resolve(snapshot, ran, query, k, options))
    except ModeMismatch as exc:
        if ran == mode:
            raise
        # Only here can another mode help; a bad value (a dim too large, a negative rescore) is reported as is.
        raise ModeMismatch(f"{exc} (mode 'auto' picked {ran!r} for this query; choose another mode)") from None


def search(snapshot: Snapshot, mode: str, query: Query, k: int = 10,
           options: Mapping[str, Any] | None = None, *, filters: Any = None, threshold: float | None = None,
           offset: int = 0, sort: str = "score") -> SearchResponse:
    """Search ``snapshot`` in ``mode``: the one entry point behind ``Index.search``, the CLI and the service.

    ``auto`` runs the mode its policy picks; the response's ``mode`` names it and ``requested_mode`` is ``"auto"``.
    ``filters`` (a :class:`~finegrain.retrieval.filters.Filters` or a mapping of its fields) restricts the
    images ranked; ``threshold`` drops hits scoring below it; ``sort`` (``score``, ``date``, ``-date``) and
    ``offset`` order and page the hits (see :mod:`finegrain.retrieval.filters`).
    """
    from . import filters as filtering

    ran, retriever, k, params = _resolve_auto(snapshot, mode, query, k, options)
    flt = filtering.Filters.from_options(filters)
    threshold, offset, sort = filtering.check_page(k, threshold, offset, sort)
    if filtering.plain(flt, threshold, offset, sort):
        response = retriever.search(snapshot, ran, query, k, params)
    else:
        response = filtering.run(retriever, snapshot, ran, query, k, params, flt, threshold, offset, sort)
    if ran != mode:
        response.requested_mode = mode
    pages.trim()  # bounds the index pages mapped into the RSS when FINEGRAIN_MAPPED_MB asks (store/pages.py)
    return response


def prepare(snapshot: Snapshot, modes_: Sequence[str] | None = None, show_progress: bool = False
            ) -> dict[str, list[str]]:
    """Build now what the first search of each mode would build (every available mode when None), so no user
    waits for it; per mode, the structures built or found cached (the l2g neighbour lists take hours at
    10^5 images). ``ValueError`` for a mode that does not exist or cannot run on this index."""
    wanted = [m for m in available(snapshot) if m != AUTO] if modes_ is None else list(modes_)
    for mode in wanted:
        why = get(mode).missing(snapshot, mode)
        if why:
            raise ValueError(why)
    return {mode: get(mode).prepare(snapshot, mode, show_progress) for mode in wanted}


def explain(snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int = 10,
            options: Mapping[str, Any] | None = None, response: SearchResponse | None = None) -> list[Explanation]:
    """Why each image of ``ids`` scored as it did for ``query`` in ``mode`` (``KeyError`` for an unknown id)."""
    mode, retriever, k, params = _resolve_auto(snapshot, mode, query, k, options)
    for i in ids:
        if not isinstance(i, (int,)) and not hasattr(i, "__index__") or int(i) not in snapshot.records:
            raise KeyError(f"unknown image id {i!r}")
    return retriever.explain(snapshot, mode, query, [int(i) for i in ids], k, params, response)
