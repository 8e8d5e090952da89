"""Two-fold landmark protocol: choose settings on one half of the landmarks, report on the other half.

A Revisited Oxford/Paris set has few landmarks and few queries, so settings
chosen on its queries are chosen on the test. Here the landmarks (each ground-truth file name
without its trailing number, ``paris_eiffel_000266`` -> ``paris_eiffel``)
are sorted by name and dealt round-robin into ``n_folds`` folds; a fold holds
its landmarks' official queries and their labelled database images. Settings
are chosen on one fold and reported on another (``protocol``: with two folds,
choose on A and report on B, then the reverse), so no reported number comes
from queries or classes that chose it. The database itself (every labelled
image plus distractors) is the same for every fold: images of the other fold's
landmarks are simply never relevant.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..datasets import RevisitopSet


def landmark_of(name: str) -> str:
    """The landmark of a ground-truth image name: the name without its trailing ``_number``
    (``paris_eiffel_000266`` -> ``paris_eiffel``, ``all_souls_000013`` -> ``all_souls``)."""
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


@dataclass(frozen=True)
class Fold:
    """One half (or n-th) of the landmarks.

    ``queries``: indices into the ground truth's ``qimlist`` (the official
    cropped queries of these landmarks); ``database``: indices into its
    ``imlist`` (the labelled images of these landmarks, the class-mAP queries).
    """

    name: str
    landmarks: tuple[str, ...]
    queries: tuple[int, ...]
    database: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"fold": self.name, "landmarks": list(self.landmarks), "queries": len(self.queries),
                "class_queries": len(self.database)}


def landmark_folds(imlist: Sequence[str], qimlist: Sequence[str], n_folds: int = 2) -> list[Fold]:
    """Deterministic folds of the landmarks: sorted by name, dealt round-robin (fold ``A`` gets the 1st, 3rd, ...).

    Every landmark with a labelled image or a query lands in exactly one fold,
    so the folds are disjoint and together cover every query.
    """
    if not 2 <= n_folds <= 26:
        raise ValueError(f"folds must be between 2 and 26, got {n_folds}")
    db_marks = [landmark_of(n) for n in imlist]
    q_marks = [landmark_of(n) for n in qimlist]
    names = sorted(set(db_marks) | set(q_marks))
    if len(names) < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} landmarks; the ground truth has {len(names)}")
    folds = []
    for f in range(n_folds):
        mine = tuple(names[f::n_folds])
        folds.append(Fold(string.ascii_uppercase[f], mine,
                          tuple(i for i, m in enumerate(q_marks) if m in mine),
                          tuple(i for i, m in enumerate(db_marks) if m in mine)))
    return folds


def bench_folds(bench: RevisitopSet, n_folds: int = 2) -> list[Fold]:
    """:func:`landmark_folds` of a loaded benchmark."""
    return landmark_folds(bench.gnd.imlist, bench.gnd.qimlist, n_folds)


def bench_labels(bench: RevisitopSet) -> list[str]:
    """The landmark of each database image (:func:`landmark_of`), the class-mAP labels of the folds."""
    return [landmark_of(n) for n in bench.gnd.imlist]


def protocol(folds: Sequence[Fold]) -> list[tuple[Fold, Fold]]:
    """``(choose_on, report_on)`` pairs: each fold reports once, with settings chosen on the next fold."""
    return [(folds[(i + 1) % len(folds)], fold) for i, fold in enumerate(folds)]


def class_relevance(labels: Sequence[str], database: Sequence[int]) -> list[dict]:
    """Class-mAP ground truth of labelled images ``database`` as queries: relevant = the other images of their
    landmark (positions in ``labels``), the query itself junk."""
    lab = np.asarray(labels)
    idx = np.arange(len(lab))
    return [{"ok": np.flatnonzero((lab == lab[q]) & (idx != q)), "junk": [q]} for q in database]


def choose(scores: dict[str, float]) -> str:
    """The best-scoring setting name; ties go to the first listed (the candidates' order is the preference)."""
    if not scores:
        raise ValueError("no candidate settings to choose from")
    best = max(scores.values())
    return next(name for name, s in scores.items() if s == best)
