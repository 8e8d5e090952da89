"""The retrieval contract: one query type, one response type, validated parameters, the Retriever ABC.

Every search mode belongs to one :class:`Retriever` (a *mode family*: dense,
multivector, local, objects). A retriever declares

* its ``modes`` and, per mode, the query kinds it accepts (``text``, ``image``);
* ``params_type``: a frozen :class:`Params` dataclass whose constructor
  validates names and ranges (an unknown key raises ``ValueError`` naming the
  known ones, as scikit-learn's ``set_params`` does);
* ``missing(snapshot, mode)``: why the mode cannot run on an index (the field
  it needs is absent), or None;
* ``search(snapshot, mode, query, k, params) -> SearchResponse`` and
  ``explain(...)``.

A retriever holds no per-call state: options arrive as ``params``, timings
leave in the response, and structures derived from an index (segment
tables, ANN indexes) are cached on the immutable
:class:`~finegrain.store.snapshot.Snapshot` they were built from.
"""

from __future__ import annotations

import dataclasses
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from ..images import ImageSource

if TYPE_CHECKING:  # pragma: no cover
    from ..explain import Explanation
    from ..store.snapshot import Snapshot

MAX_K = 10_000
MAX_QUERY_CHARS = 2_000

TEXT = "text"
IMAGE = "image"
BOTH = frozenset({TEXT, IMAGE})
IMAGE_ONLY = frozenset({IMAGE})



class ModeMismatch(ValueError):
    """A mode cannot serve this search at all: the query kind, combined terms, what the index holds, or an
    option it does not know. Another mode may (``auto`` says which one it picked); a bad value is a plain
    ``ValueError``."""


def check_k(k: Any) -> int:
    """``k`` as an int in 1..MAX_K, else ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, int) and not hasattr(k, "__index__"):
        raise ValueError(f"k must be an integer between 1 and {MAX_K}")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer between 1 and {MAX_K}")
    return k


def check_text(text: Any) -> str:
    """A non-empty, valid-Unicode text query of at most MAX_QUERY_CHARS characters, else ``ValueError``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("the text query is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f"the text query is longer than {MAX_QUERY_CHARS} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (e.g. "\ud800" in JSON): tokenizers raise TypeError
        raise ValueError("the text query is not valid Unicode (it contains lone surrogates)") from None
    return text


@dataclass(frozen=True)
class Term:
    """One weighted part of a combined query: a ``text`` or an example ``image`` (optional ``bbox``), never both.

    ``weight`` is any finite non-zero number; a negative weight pushes results
    away from the term (``Query.parse('"a beach" - "people"')``).
    """

    weight: float
    text: str | None = None
    image: ImageSource | None = None
    bbox: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                and not hasattr(self.weight, "__float__"):
            raise ValueError(f"a term's weight must be a number, not {self.weight!r}")
        weight = float(self.weight)
        if not math.isfinite(weight) or weight == 0:
            raise ValueError(f"a term's weight must be a finite non-zero number, not {self.weight!r}")
        object.__setattr__(self, "weight", weight)
        if (self.text is None) == (self.image is None):
            raise ValueError("a term is exactly one of text= or image=")
        q = Query(text=self.text, image=self.image, bbox=self.bbox)  # the single-query checks (text, box)
        object.__setattr__(self, "bbox", q.bbox)

    @property
    def kind(self) -> str:
        return TEXT if self.text is not None else IMAGE

    def query(self) -> Query:
        """This term alone, as a plain query (what each mode embeds)."""
        return Query(text=self.text, image=self.image, bbox=self.bbox)

    def describe(self) -> str:
        what = self.text if self.text is not None else "@" + self.query().describe()
        return f"{self.weight:g}:{what}"


@dataclass(frozen=True)
class Query:
    """What to search for: a ``text``, an example ``image`` (path, bytes or PIL image), or weighted ``terms``.

    ``bbox`` (x0, y0, x1, y1 in pixels of the upright query image) restricts
    an image query to a box. One policy for every mode: four finite numbers
    with x0 < x1 and y0 < y1, clipped to the image when it is decoded
    (:meth:`clip_box`); a box that misses the image is an error.

    A *combined* query has several :class:`Term` s (``"a beach" + "sunset" -
    "people"``, ``2:"red car"``, text plus an example image, negatives):
    ``Query(text=..., image=..., terms=(Term(-1, text="people"),))`` or
    :meth:`parse`. It keeps every part in ``terms`` (``text``, ``image`` and
    ``bbox`` become None; the box goes with the image's term); a query that
    comes down to one positive term is the plain query of that term.
    """

    text: str | None = None
    image: ImageSource | None = None
    bbox: tuple[float, float, float, float] | None = None
    terms: tuple[Term, ...] = ()

    def __post_init__(self) -> None:
        if self.terms or (self.text is not None and self.image is not None):
            self._combine()
            return
        if (self.text is None) == (self.image is None):
            raise ValueError("give exactly one of text= or image=")
        if self.text is not None:
            check_text(self.text)
            if self.bbox is not None:
                raise ValueError("bbox applies to image queries only")
        if self.bbox is not None:
            try:
                box = tuple(float(v) for v in self.bbox)
            except (TypeError, ValueError):
                raise ValueError("bbox needs four numbers: x0 y0 x1 y1") from None
            if len(box) != 4:
                raise ValueError("bbox needs four numbers: x0 y0 x1 y1")
            if not all(math.isfinite(v) for v in box):
                raise ValueError(f"bbox {box} has a value that is not a finite number")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"bbox {box} is empty: need x0 < x1 and y0 < y1")
            object.__setattr__(self, "bbox", box)

    def _combine(self) -> None:
        """Move text/image (weight 1) into ``terms``; one positive term left alone becomes a plain query."""
        terms = list(self.terms)
        if not all(isinstance(t, Term) for t in terms):
            raise ValueError("terms must be Term objects (Term(weight, text=...) or Term(weight, image=...))")
        if self.bbox is not None and self.image is None:
            raise ValueError("bbox applies to image queries only")
        head = []
        if self.text is not None:
            head.append(Term(1.0, text=self.text))
        if self.image is not None:
            head.append(Term(1.0, image=self.image, bbox=self.bbox))
        terms = head + terms
        if not any(t.weight > 0 for t in terms):
            raise ValueError("a query needs at least one positive term (only negative ones were given)")
        if len(terms) == 1:  # e.g. Query.parse('2:"red car"'): the weight of a lone term changes nothing
            t = terms[0]
            object.__setattr__(self, "terms", ())
            object.__setattr__(self, "text", t.text)
            object.__setattr__(self, "image", t.image)
            object.__setattr__(self, "bbox", t.bbox)
            self.__post_init__()
            return
        object.__setattr__(self, "terms", tuple(terms))
        object.__setattr__(self, "text", None)
        object.__setattr__(self, "image", None)
        object.__setattr__(self, "bbox", None)

    @classmethod
    def parse(cls, expression: str, images: bool = True) -> Query:
        """A query from the text syntax ``"a beach" + "sunset" - "people"``, ``2:"red car"``, ``@photo.jpg``.

        See :mod:`finegrain.retrieval.terms`; ``images=False`` reads ``@`` as text.
        """
        from .terms import parse

        return cls(terms=tuple(parse(expression, images=images)))

    @property
    def combined(self) -> bool:
        """Whether this query has several weighted terms."""
        return bool(self.terms)

    @property
    def kinds(self) -> frozenset[str]:
        """The kinds of its parts: ``{"text"}``, ``{"image"}`` or both."""
        if self.terms:
            return frozenset(t.kind for t in self.terms)
        return frozenset({self.kind})

    @property
    def kind(self) -> str:
        """``"text"``, ``"image"``, or ``"text+image"`` for a combined query with both."""
        if self.terms:
            kinds = {t.kind for t in self.terms}
            return kinds.pop() if len(kinds) == 1 else f"{TEXT}+{IMAGE}"
        return TEXT if self.text is not None else IMAGE

    def clip_box(self, size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The box clipped to an image of ``size`` (width, height); ``ValueError`` if nothing is left."""
        if self.bbox is None:
            return None
        x0, y0, x1, y1 = self.bbox
        W, H = size
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(W), x1), min(float(H), y1)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"bbox {self.bbox} is empty inside the {W}x{H} query image")
        return x0, y0, x1, y1

    def describe(self) -> str:
        if self.terms:
            return " ".join(t.describe() for t in self.terms)
        if self.text is not None:
            return self.text
        return str(self.image) if isinstance(self.image, (str, os.PathLike)) else "image"


@dataclass(frozen=True)
class SearchResult:
    """One hit: image id, file path, similarity score (higher is better), 0-based rank, shard (shard sets only)."""

    id: int
    path: str
    score: float
    rank: int
    shard: int | None = None
    taken: str | None = None  # capture date (ISO wall clock), set when results are sorted by date

    def as_dict(self) -> dict:
        d: dict[str, Any] = {"id": self.id, "path": self.path, "score": round(self.score, 6), "rank": self.rank}
        if self.shard is not None:
            d["shard"] = self.shard
        if self.taken is not None:
            d["taken"] = self.taken
        return d


@dataclass
class SearchStats:
    """Work one search did: similarity operations (one query vector against one stored vector), levels visited."""

    sim_ops: int = 0
    levels_visited: int = 0
    candidates_per_level: list[int] = field(default_factory=list)


@dataclass
class SearchResponse(Sequence[SearchResult]):
    """What every mode (and every shard set) answers: the hits, best first, and how they were found.

    Behaves as the sequence of its hits (``for hit in index.search(...)``).
    ``subqueries`` holds the (sub-)query texts used, the full query first;
    ``timings`` stage times in milliseconds; ``partial`` names shards that did not answer.
    """

    hits: list[SearchResult]
    mode: str
    stats: SearchStats = field(default_factory=SearchStats)
    subqueries: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    generation: int = -1
    partial: list[str] = field(default_factory=list)
    requested_mode: str | None = None  # "auto" when the mode was picked for the query (``mode`` is what ran)
    allowed: int | None = None  # images the filters allowed (None: no filter)

    @overload
    def __getitem__(self, i: int) -> SearchResult: ...

    @overload
    def __getitem__(self, i: slice) -> list[SearchResult]: ...

    def __getitem__(self, i):
        return self.hits[i]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[SearchResult]:
        return iter(self.hits)

    def as_dict(self) -> dict:
        picked = {} if self.requested_mode is None else {"requested_mode": self.requested_mode}
        return {"mode": self.mode, **picked, "subqueries": list(self.subqueries[1:]),
                "sim_ops": int(self.stats.sim_ops), "levels_visited": int(self.stats.levels_visited),
                "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
                **({} if self.allowed is None else {"allowed": self.allowed}),
                **({"partial": list(self.partial)} if self.partial else {}),
                "results": [h.as_dict() for h in self.hits]}


P = TypeVar("P", bound="Params")


@dataclass(frozen=True)
class Params:
    """Base of every retriever's parameters: a frozen dataclass, validated in ``__post_init__``.

    :meth:`from_options` merges saved defaults with per-call options; None
    values mean "not given"; an unknown name raises ``ValueError`` listing the known ones.
    """

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls: type[P], options: Mapping[str, Any] | None = None,
                     defaults: Mapping[str, Any] | None = None, mode: str | None = None) -> P:
        known = set(cls.names())
        given = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(given) - known)
        if unknown:
            where = f" of mode {mode!r}" if mode else ""
            raise ModeMismatch(f"unknown search option(s){where}: {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known)) or 'none'}")
        saved = {k: v for k, v in (defaults or {}).items() if k in known and v is not None}
        try:
            return cls(**{**saved, **given})
        except TypeError as exc:  # a value of the wrong type inside a check
            raise ValueError(f"bad search option: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NoParams(Params):
    """Modes without options."""


def number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, integer: bool = False,
           lo_open: bool = False, hi_open: bool = False) -> None:
    """Range check of one parameter with a message naming it (used by the ``Params`` classes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ValueError(f"{name} must be a number, not {value!r}")
    if integer and float(value) != int(value):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name} must be in {left}{'-inf' if lo is None else lo}, "
                         f"{'inf' if hi is None else hi}{right}, "
                         f"not {value!r}")


class Retriever(ABC):
    """A family of search modes over an index snapshot (see the module docstring)."""

    #: Family name (``dense``, ``multivector``, ``local``, ``objects``).
    name: ClassVar[str]
    #: The modes this family answers, in the order they are listed to users.
    modes: ClassVar[tuple[str, ...]]
    #: Per mode, the query kinds accepted (``{"text", "image"}``); modes not listed accept both.
    query_kinds: ClassVar[Mapping[str, frozenset[str]]] = {}
    #: Parameter type (all modes of the family share it).
    params_type: ClassVar[type[Params]] = NoParams
    #: One line per mode for help texts.
    descriptions: ClassVar[Mapping[str, str]] = {}
    #: Whether its modes take combined queries (weighted terms, negatives; :class:`Query` ``terms``).
    combines_terms: ClassVar[bool] = False
    #: Whether ``search`` takes ``allowed=`` (a boolean mask over snapshot positions) and ranks only those
    #: images (retrieval/filters.py); a family without it is searched in full and its hits filtered.
    filterable: ClassVar[bool] = False

    def accepts(self, mode: str) -> frozenset[str]:
        return self.query_kinds.get(mode, BOTH)

    def accepts_on(self, snapshot: Snapshot, mode: str) -> frozenset[str]:
        """The query kinds ``mode`` answers on this index (narrower than :meth:`accepts` where its settings say)."""
        return self.accepts(mode)

    def missing(self, snapshot: Snapshot, mode: str) -> str | None:
        """Why ``mode`` cannot run on ``snapshot`` (what the index lacks and how to add it), or None."""
        return None

    def params(self, snapshot: Snapshot, mode: str, options: Mapping[str, Any] | None) -> Params:
        """Validated parameters: the index's saved settings overridden by ``options``."""
        return self.params_type.from_options(options, mode=mode)

    def prepare(self, snapshot: Snapshot, mode: str, show_progress: bool = False) -> list[str]:
        """Build now the search structures ``mode``'s first search would build (FAISS indexes, neighbour
        lists; cached on disk per index state) and name each; default: nothing to build."""
        return []

    @abstractmethod
    def search(self, snapshot: Snapshot, mode: str, query: Query, k: int, params: Params) -> SearchResponse:
        """Rank the snapshot's images for ``query``; at most ``k`` hits, best first."""

    def explain(self, snapshot: Snapshot, mode: str, query: Query, ids: Sequence[int], k: int, params: Params,
                response: SearchResponse | None = None) -> list[Explanation]:
        """Why each of ``ids`` scored as it did (default: the global score of the whole image)."""
        from ..explain import explain_global

        return explain_global(snapshot, mode, query, ids)
