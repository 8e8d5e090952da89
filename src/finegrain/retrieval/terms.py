"""Combined queries: the text syntax users write, and how a mode combines weighted terms (docs/queries.md).

Syntax (rclip-style)::

    "a beach" + "sunset" - "people"      terms joined by + and -
    2:"red car" + 0.5:"night"            a positive number and a colon weight a term
    a beach + sunset - people            unquoted terms run to the next lone + or -
    @photo.jpg - "people"                @ names an example image (a path; CLI and Python only)

An operator is a ``+`` or ``-`` standing alone (spaces or a quote around it),
so ``t-shirt`` and ``black-and-white`` stay words. Quotes are ``"`` (anywhere)
or ``'`` (opening a term); ``\\"`` escapes a quote inside one. Errors are
one-line ``ValueError`` s: unbalanced quote, weight that is not a positive
number, empty term, an operator with nothing after it; :class:`Query` adds
"only negative terms".

Dense modes embed each term, L2-normalise it, sum the vectors by weight and
re-normalise (as rclip does); :func:`combine` is that sum.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .base import MAX_QUERY_CHARS, Query, Term

if TYPE_CHECKING:  # pragma: no cover
    from ..images import ImageSource

__all__ = ["parse", "build_query", "combine", "embed_terms"]

_QUOTES = "\"'"
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")


def _is_operator(text: str, i: int) -> bool:
    """A lone ``+``/``-`` at ``i``: followed by whitespace, a quote, ``@`` or the end."""
    return text[i] in "+-" and (i + 1 == len(text) or text[i + 1].isspace() or text[i + 1] in _QUOTES + "@")


def parse(expression: str, images: bool = True) -> list[Term]:
    """The weighted terms of ``expression`` (see the module docstring); ``ValueError`` with a one-line reason."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("the query is empty")
    if len(expression) > MAX_QUERY_CHARS:
        raise ValueError(f"the query is longer than {MAX_QUERY_CHARS} characters")
    text, n, i = expression, len(expression), 0
    terms: list[Term] = []
    sign = 1.0
    expect_term = True  # at the start, and after an operator
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i == n:
            if expect_term:
                raise ValueError("the query ends with an operator: give a term after the last + or -"
                                 if terms or sign < 0 else "the query is empty")
            break
        if _is_operator(text, i):
            if expect_term and (terms or sign < 0):
                raise ValueError(f"empty term: two operators in a row at character {i + 1}")
            sign = 1.0 if text[i] == "+" else -1.0
            expect_term = True
            i += 1
            continue
        if not expect_term:
            raise ValueError(f"expected + or - between terms at character {i + 1} "
                             f"({text[i:i + 20]!r}); quote a term that holds several parts")
        weight, i = _weight(text, i)
        image = images and i < n and text[i] == "@"
        if image:
            i += 1
        value, i = _value(text, i)
        if not value.strip():
            raise ValueError(f"empty term at character {i} (a term needs some text{' or a path' if images else ''})")
        terms.append(Term(sign * weight, image=value) if image else Term(sign * weight, text=value.strip()))
        sign, expect_term = 1.0, False
    return terms  # Query checks that one term is positive (the CLI adds --text/--image terms to an expression)


def _weight(text: str, i: int) -> tuple[float, int]:
    """An optional ``NUMBER:`` prefix (before a quote, ``@`` or a word); (1, i) when there is none."""
    quoted = re.compile(r"([^\s:\"'@]+):(?=[\"'@])").match(text, i)  # anything: before a quote it must be a weight
    m = quoted or re.compile(r"([^\s:\"'@]+):(?=[^\s0-9])").match(text, i)
    if m is None:
        return 1.0, i
    raw = m.group(1)
    if not _NUMBER.fullmatch(raw):
        if quoted is None:  # "note:the dog" is text
            return 1.0, i
        raise ValueError(f"the weight {raw!r} is not a number (write a positive number before the colon, "
                         "e.g. 2:\"red car\")")
    weight = float(raw)
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"the weight {raw!r} must be a positive number (use - for a negative term)")
    return weight, m.end()


def _value(text: str, i: int) -> tuple[str, int]:
    """A quoted string (escapes ``\\"``) or bare text up to the next lone operator; (value, next position)."""
    n = len(text)
    if i < n and text[i] in _QUOTES:
        quote, j, out = text[i], i + 1, []
        while j < n and text[j] != quote:
            if text[j] == "\\" and j + 1 < n and text[j + 1] in (quote, "\\"):
                j += 1
            out.append(text[j])
            j += 1
        if j >= n:
            raise ValueError(f"unbalanced quote: the {quote} at character {i + 1} is never closed")
        return "".join(out), j + 1
    j = i
    while j < n and not (text[j].isspace() and _next_is_operator(text, j)):
        if text[j] == '"':
            raise ValueError(f"a quote in the middle of the term at character {j + 1}: quote the whole term")
        j += 1
    return text[i:j], j


def _next_is_operator(text: str, j: int) -> bool:
    k = j
    while k < len(text) and text[k].isspace():
        k += 1
    return k < len(text) and _is_operator(text, k)


def build_query(text: str | None = None, image: ImageSource | None = None, bbox: Sequence[float] | None = None,
                negative: str | Sequence[str] | None = None, negative_image: ImageSource | Sequence | None = None,
                terms: Sequence[Term] = (), query: Query | str | None = None) -> Query:
    """One :class:`Query` from the search keywords of the API, CLI and service.

    ``query``: a :class:`Query`, or an expression to :func:`parse`; ``text``
    and ``image`` add positive terms (weight 1), ``negative`` texts and
    ``negative_image`` example images negative ones (weight -1), ``terms``
    any :class:`Term` s.
    """
    extra = list(terms)
    if isinstance(negative, str):
        negative = [negative]
    extra += [Term(-1.0, text=t) for t in negative or ()]
    if negative_image is not None and (isinstance(negative_image, (str, bytes)) or not isinstance(negative_image,
                                                                                                (list, tuple))):
        negative_image = [negative_image]
    extra += [Term(-1.0, image=im) for im in negative_image or ()]
    if query is not None:
        parsed = Query.parse(query) if isinstance(query, str) else query
        if not isinstance(parsed, Query):
            raise ValueError(f"query must be a Query or an expression string, not {type(query).__name__}")
        extra = list(parsed.terms or [Term(1.0, text=parsed.text, image=parsed.image, bbox=parsed.bbox)]) + extra
    if text is None and image is None and not extra:
        raise ValueError("give exactly one of text= or image=")
    box = None if bbox is None else tuple(bbox)
    return Query(text=text, image=image, bbox=box, terms=tuple(extra))  # type: ignore[arg-type]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of the L2-normalised rows of ``vectors``, re-normalised (rclip's arithmetic)."""
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    out = (np.asarray(weights, dtype=np.float32)[:, None] * v).sum(axis=0)
    norm = float(np.linalg.norm(out))
    if norm < 1e-6:
        raise ValueError("the query's terms cancel each other out (their weighted sum is zero)")
    return (out / norm).astype(np.float32)


def embed_terms(query: Query, embed_texts: Callable[[list[str]], np.ndarray],
                embed_one: Callable[[Query], np.ndarray]) -> np.ndarray:
    """The combined vector of a query's terms: texts embedded in one batch, each image (with its box) alone."""
    texts = [t.text for t in query.terms if t.text is not None]
    text_vectors = iter(embed_texts(texts) if texts else [])
    vectors = [next(text_vectors) if t.text is not None else embed_one(t.query()) for t in query.terms]
    return combine(np.stack(vectors), [t.weight for t in query.terms])
