"""Duplicate finding: exact copies, near-duplicates (edited copies) and similar shots (docs/duplicates.md).

Three kinds, from strongest to weakest:

* **exact**: the same file content (the catalog's SHA-256);
* **near**: the same photo after an edit: re-encoded, resized, cropped a
  little, rotated by 90/180/270 degrees or mirrored;
* **similar**: a different photo of the same scene (burst shots, a camera
  moved a little).

Two signals, because one is not enough. The global embedding finds
candidates (FAISS range search of the index's vectors, no Python loop over
pairs of images), but it is semantic: two burst frames score higher than a
photo and its half-size copy (Flickr8k: about 0.9 against 0.7). So each
candidate pair is verified on pixels: 16x16 grey signatures of the whole
image and of centre crops (90%, 80%), compared under all eight rotations and
mirrors; an edited copy matches at about 1.0 (a crop at about 0.9), burst
frames shifted by a quarter of the frame far lower. A global embedding is
not rotation invariant either, so each image is also embedded under a few
transforms (by default 90 and 180 degree rotations and a mirror; a pair
needs the transform in one direction only, so these also cover 270
degrees), and those embeddings are range-searched against the index.

Thresholds were chosen on generated copies of Flickr8k train images and
measured on dev images (experiments/duplicates/, docs/duplicates.md).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import ImageLoadError, load_image
from .progress import progress_bar

#: Calibrated on Flickr8k train copies (experiments/duplicates/calibrate.py; docs/duplicates.md).
NEAR_THRESHOLD = 0.911  # pixel-signature match of a near-duplicate
CANDIDATE_THRESHOLD = 0.45  # embedding cosine below which a pair is never a near-duplicate
SIMILAR_THRESHOLD = 0.73  # embedding cosine of "similar" (burst-like) pairs
SIGNATURE_SIDE = 16
SIGNATURE_CROPS = (1.0, 0.9, 0.8)  # centre crops signed, so a slightly cropped copy still matches
#: Transforms of a (3, S, S) prepared image; spatial ops commute with the encoders' square resize.
TRANSFORMS = {
    "rot90": lambda x: np.rot90(x, 1, axes=(-2, -1)),
    "rot180": lambda x: np.rot90(x, 2, axes=(-2, -1)),
    "flip": lambda x: x[..., :, ::-1],
    "flipv": lambda x: x[..., ::-1, :],
    "transpose": lambda x: np.swapaxes(x, -2, -1),
    "transverse": lambda x: np.rot90(np.swapaxes(x, -2, -1), 2, axes=(-2, -1)),
}
#: rot90, rot180 and a mirror find copies rotated by 90, 180 or 270 degrees and mirrored ones.
DEFAULT_TRANSFORMS = ("rot90", "rot180", "flip")
#: Every non-identity element of the dihedral group up to inverses (rot270 is rot90's inverse).
DIHEDRAL = tuple(TRANSFORMS)
KINDS = ("exact", "near", "similar")
CANDIDATE_KNN = 20  # near candidates below the similar threshold: among each image's 20 nearest only


def parse_transforms(text: str) -> tuple[str, ...]:
    """``"rot90,rot180,flip"``, ``"dihedral"`` (all six) or ``"none"``; ValueError on unknown names."""
    text = text.strip().lower()
    if text == "none":
        return ()
    if text == "dihedral":
        return DIHEDRAL
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown or not names:
        raise ValueError(f"unknown transform(s) {unknown or [text]}; choose from {', '.join(TRANSFORMS)}, "
                         "'dihedral' or 'none'")
    return names


def pixel_signature(image) -> np.ndarray:
    """(len(SIGNATURE_CROPS), 16, 16) zero-mean, unit-norm grey signatures of the image and its centre crops."""
    grey = image.convert("L")
    w, h = grey.size
    out = []
    for scale in SIGNATURE_CROPS:
        dx, dy = (w - w * scale) / 2, (h - h * scale) / 2
        crop = grey.crop((round(dx), round(dy), round(w - dx), round(h - dy))) if scale < 1 else grey
        a = np.asarray(crop.resize((SIGNATURE_SIDE, SIGNATURE_SIDE), resample=4), np.float32)  # 4: BOX
        a = a - a.mean()
        out.append(a / max(float(np.linalg.norm(a)), 1e-6))
    return np.stack(out)


def _dihedral8(x: np.ndarray) -> np.ndarray:
    """All eight rotations/mirrors of (..., S, S) arrays, stacked on a new first axis."""
    rots = [np.rot90(x, k, axes=(-2, -1)) for k in range(4)]
    return np.stack(rots + [r[..., :, ::-1] for r in rots])


def pixel_scores(sig_a: np.ndarray, sig_b: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Best correlation of pairs of signatures (m, C, S, S) over the 8 dihedral transforms and the crops.

    The whole of one image is compared with the whole and the centre crops of
    the other, both ways round, so a copy cropped by up to about 20% matches.
    """
    out = np.empty(len(sig_a), np.float32)
    for s in range(0, len(sig_a), batch):
        a, b = sig_a[s:s + batch], sig_b[s:s + batch]
        ga = _dihedral8(a).reshape(8, len(a), a.shape[1], -1)  # (8, m, C, S*S)
        fb = b.reshape(len(b), b.shape[1], -1)
        whole_a_vs_b = np.einsum("gmd,mcd->gmc", ga[:, :, 0], fb)  # a's whole image vs b's whole and crops
        a_crops_vs_whole_b = np.einsum("gmcd,md->gmc", ga, fb[:, 0])  # a's crops vs b's whole image
        out[s:s + batch] = np.maximum(whole_a_vs_b.max(axis=(0, 2)), a_crops_vs_whole_b.max(axis=(0, 2)))
    return out


@dataclass
class Signatures:
    """Per readable image (``positions`` into the global rows): transformed embeddings and pixel signatures."""

    embeddings: dict[str, np.ndarray]
    positions: np.ndarray
    pixels: np.ndarray
    unreadable: list[int] = field(default_factory=list)  # image ids whose files could not be read


@dataclass
class Pairs:
    """Candidate pairs as parallel arrays: ids ``a < b``, identity cosine, best cosine over transforms, pixel match.

    ``pixel`` is NaN where a file could not be read.
    """

    a: np.ndarray
    b: np.ndarray
    identity: np.ndarray
    score: np.ndarray
    pixel: np.ndarray
    unreadable: list[int] = field(default_factory=list)

    def select(self, keep: np.ndarray) -> Pairs:
        return Pairs(self.a[keep], self.b[keep], self.identity[keep], self.score[keep], self.pixel[keep],
                     self.unreadable)


def image_signatures(index, transforms: Sequence[str], batch: int = 32, show_progress: bool = False) -> Signatures:
    """Decode every indexed image once: embeddings under ``transforms`` and pixel signatures."""
    from . import encoders

    if transforms and encoders.is_external(index.catalog.get_meta("encoder")):
        raise ValueError("this index holds imported embeddings finegrain cannot compute, so it cannot embed rotated "
                         "copies: use transforms 'none' (--transforms none)")
    rows = index.global_rows
    encoder = index.encoder if transforms else None
    out: dict[str, list[np.ndarray]] = {t: [] for t in transforms}
    positions: list[int] = []
    pixels: list[np.ndarray] = []
    unreadable: list[int] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending and encoder is not None:
            for t in transforms:
                fn = TRANSFORMS[t]
                out[t].append(encoder.encode_pixels(np.stack([np.ascontiguousarray(fn(p)) for p in pending])))
        pending.clear()

    # The same decode with or without transforms: the pixel threshold was calibrated on 224-pixel decodes.
    side = encoder.image_size if encoder is not None else 224
    with progress_bar(len(rows), "checking pixels, rotations and mirrors", show_progress) as bar:
        for pos, owner in enumerate(rows.owners.tolist()):
            try:
                image = load_image(index.records[owner].path, draft_size=side)
            except (ImageLoadError, OSError):
                unreadable.append(int(owner))
                bar.advance(1)
                continue
            positions.append(pos)
            pixels.append(pixel_signature(image))
            if encoder is not None:
                pending.append(encoder.prepare_image(image))
            if len(pending) >= batch:
                flush()
            bar.advance(1)
        flush()
    dim = rows.vectors.shape[1]
    empty = np.zeros((0, len(SIGNATURE_CROPS), SIGNATURE_SIDE, SIGNATURE_SIDE), np.float32)
    return Signatures({t: np.concatenate(v) if v else np.zeros((0, dim), np.float32) for t, v in out.items()},
                      np.asarray(positions, dtype=np.int64), np.stack(pixels) if pixels else empty, unreadable)


def score_pairs(index, floor: float, transforms: Sequence[str] = DEFAULT_TRANSFORMS, show_progress: bool = False,
                signatures: Signatures | None = None, knn: int = 0, knn_floor: float | None = None) -> Pairs:
    """Every pair of images whose best embedding cosine (identity or a transform) is at least ``floor``.

    FAISS range search of the index's global vectors against themselves, and
    of each transformed embedding against them; then each pair's pixel match.
    With ``knn`` and a lower ``knn_floor``, pairs scoring between the two are
    added too, but only among each image's ``knn`` nearest neighbours (a
    low floor over a whole collection would return a share of all n^2/2 pairs).
    ``signatures`` reuses an :func:`image_signatures` result (computed with ``transforms``).
    """
    import faiss

    rows = index.global_rows
    vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
    n = len(vectors)
    owners = rows.owners
    if n < 2:
        empty = np.zeros(0, np.int64)
        none = np.zeros(0, np.float32)
        return Pairs(empty, empty, none, none, none)
    if signatures is None:
        signatures = image_signatures(index, transforms, show_progress=show_progress)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    found_q, found_r, found_s = [], [], []

    def search(queries: np.ndarray, query_rows: np.ndarray) -> None:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        lims, dist, idx = flat.range_search(queries, float(floor))
        counts = np.diff(np.asarray(lims, dtype=np.int64)).astype(np.int64)
        q = np.repeat(query_rows, counts)
        keep = q != idx
        found_q.append(q[keep])
        found_r.append(idx[keep].astype(np.int64))
        found_s.append(dist[keep])
        if knn > 0 and knn_floor is not None and knn_floor < floor:
            dist, idx = flat.search(queries, min(knn + 1, n))
            q = np.repeat(query_rows, idx.shape[1])
            dist, idx = dist.ravel(), idx.ravel()
            keep = (idx >= 0) & (q != idx) & (dist >= knn_floor) & (dist < floor)
            found_q.append(q[keep])
            found_r.append(idx[keep].astype(np.int64))
            found_s.append(dist[keep])

    search(vectors, np.arange(n))
    for t in transforms:
        if len(signatures.positions):
            search(signatures.embeddings[t], signatures.positions)
    q, r, s = np.concatenate(found_q), np.concatenate(found_r), np.concatenate(found_s)
    lo, hi = np.minimum(q, r), np.maximum(q, r)
    key = lo * n + hi
    order = np.lexsort((-s, key))  # per pair, the best score first
    key, s = key[order], s[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    key, best = key[first], s[first]
    lo, hi = key // n, key % n
    identity = np.einsum("ij,ij->i", vectors[lo], vectors[hi])
    best = np.maximum(best, identity)
    slot = np.full(n, -1, np.int64)
    slot[signatures.positions] = np.arange(len(signatures.positions))
    readable = (slot[lo] >= 0) & (slot[hi] >= 0)
    pixel = np.full(len(lo), np.nan, np.float32)
    if readable.any():
        pixel[readable] = pixel_scores(signatures.pixels[slot[lo[readable]]], signatures.pixels[slot[hi[readable]]])
    a, b = owners[lo], owners[hi]
    swap = a > b
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    return Pairs(a, b, identity.astype(np.float32), best.astype(np.float32), pixel, signatures.unreadable)


@dataclass
class DuplicateReport:
    """Groups of exact, near and similar images, the pairs behind them, and the settings used."""

    groups: list[dict]
    pairs: list[dict]
    near: float
    similar: float
    candidate: float
    transforms: tuple[str, ...]
    images: int
    unreadable: list[int]

    def counts(self) -> dict[str, int]:
        return {kind: sum(g["kind"] == kind for g in self.groups) for kind in KINDS}

    def as_dict(self) -> dict:
        return {"images": self.images,
                "thresholds": {"near": self.near, "similar": self.similar, "candidate": self.candidate},
                "transforms": list(self.transforms), "counts": self.counts(), "groups": self.groups,
                "pairs": self.pairs, "unreadable": self.unreadable}


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def find_duplicates(index, near: float = NEAR_THRESHOLD, similar: float = SIMILAR_THRESHOLD,
                    candidate: float = CANDIDATE_THRESHOLD, transforms: Sequence[str] = DEFAULT_TRANSFORMS,
                    show_progress: bool = False, pairs: Pairs | None = None, knn: int = CANDIDATE_KNN,
                    signatures: Signatures | None = None) -> DuplicateReport:
    """Group ``index``'s images into exact, near and similar groups (see the module docstring).

    A pair is *exact* when the files have the same SHA-256, *near* when its
    embedding cosine (best over the transforms) is at least ``candidate`` and
    its pixel match at least ``near``, *similar* when its embedding cosine is
    at least ``similar`` otherwise. A group of one kind is a connected
    component of the pairs of that kind or stronger, reported when it has a
    pair of that kind (so an exact pair that also has a rotated copy shows as
    an exact group and a near group). Pairs below ``similar`` are near
    candidates only among each image's ``knn`` nearest neighbours (per
    transform). ``pairs`` reuses a :func:`score_pairs` result (all its pairs
    are considered), ``signatures`` an :func:`image_signatures` one.
    """
    for name, value in (("near", near), ("similar", similar), ("candidate", candidate)):
        if not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
            raise ValueError(f"the {name} threshold must be a number between -1 and 1, not {value!r}")
    transforms = tuple(transforms)
    if pairs is None:
        pairs = score_pairs(index, similar, transforms, show_progress, signatures=signatures, knn=knn,
                            knn_floor=candidate)
    pairs = pairs.select(pairs.score >= min(candidate, similar))
    records = index.records
    ids = records.ids.tolist()  # ascending
    pos = {image_id: i for i, image_id in enumerate(ids)}
    sha_of = dict(zip(ids, records.texts("sha256")))  # one column read, not a record per image
    # Exact pairs from the content hash: a chain per hash is enough to connect its group.
    by_hash: dict[str, list[int]] = {}
    for image_id in ids:
        sha = sha_of[image_id]
        if sha:
            by_hash.setdefault(sha, []).append(image_id)
    exact = [(g[i], g[i + 1]) for g in by_hash.values() for i in range(len(g) - 1)]
    with np.errstate(invalid="ignore"):  # NaN pixel match (unreadable file): never near
        is_near = (pairs.score >= candidate) & (pairs.pixel >= near)
    keep = is_near | (pairs.score >= similar)  # the rest is never reported (exact pairs come from the hashes)
    pairs, is_near = pairs.select(keep), is_near[keep]
    pair_rows = []
    for a, b, ident, score, pixel, n in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.identity.tolist(),
                                            pairs.score.tolist(), pairs.pixel.tolist(), is_near.tolist()):
        sha_a = sha_of[a]
        if sha_a and sha_a == sha_of[b]:
            kind = "exact"
        elif n:
            kind = "near"
        elif score >= similar:
            kind = "similar"
        else:
            continue
        pair_rows.append({"a": a, "b": b, "kind": kind, "score": round(score, 4), "identity": round(ident, 4),
                          "pixel": None if math.isnan(pixel) else round(pixel, 4)})
    present = {frozenset((p["a"], p["b"])) for p in pair_rows}
    for a, b in exact:  # identical files always pair, whatever their vectors say
        if frozenset((a, b)) not in present:
            pair_rows.append({"a": a, "b": b, "kind": "exact", "score": 1.0, "identity": 1.0, "pixel": 1.0})
    groups: list[dict] = []
    strength = {"exact": 0, "near": 1, "similar": 2}
    for level, kind in enumerate(KINDS):
        edges = [p for p in pair_rows if strength[p["kind"]] <= level]
        if not edges:
            continue
        ea = np.asarray([pos[p["a"]] for p in edges])
        eb = np.asarray([pos[p["b"]] for p in edges])
        labels = _components(len(ids), ea, eb)
        own = {int(labels[pos[p["a"]]]) for p in edges if p["kind"] == kind}
        members: dict[int, list[int]] = {}
        for image_id in ids:
            if int(labels[pos[image_id]]) in own:
                members.setdefault(int(labels[pos[image_id]]), []).append(image_id)
        span: dict[int, tuple[float, float]] = {}
        for p in edges:
            label = int(labels[pos[p["a"]]])
            lo, hi = span.get(label, (p["score"], p["score"]))
            span[label] = (min(lo, p["score"]), max(hi, p["score"]))
        for label, group_ids in sorted(members.items(), key=lambda kv: kv[1][0]):
            groups.append({"kind": kind, "ids": group_ids, "paths": [records[i].path for i in group_ids],
                           "min_score": span[label][0], "max_score": span[label][1]})
    pair_rows.sort(key=lambda p: (strength[p["kind"]], -p["score"], p["a"], p["b"]))
    return DuplicateReport(groups, pair_rows, near, similar, candidate, transforms, len(ids), pairs.unreadable)


# ------------------------------------------------------------------ HTML report
def _thumbnail(path: str, side: int) -> str | None:
    try:
        image = load_image(path, draft_size=side)
    except (ImageLoadError, OSError):
        return None
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}
section{border:1px solid #ddd;border-radius:6px;margin:12px 0;padding:8px 12px}
section.exact{border-left:6px solid #c0392b}section.near{border-left:6px solid #e67e22}
section.similar{border-left:6px solid #2980b9}.imgs{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;width:170px}figure img{max-width:160px;max-height:160px;display:block}
figcaption{font-size:12px;word-break:break-all;color:#555}.missing{width:160px;height:100px;background:#eee}"""


def write_html(report: DuplicateReport, path: str | os.PathLike, thumb_side: int = 160, max_groups: int = 1000) -> None:
    """A self-contained HTML page: one section per group, thumbnails inlined as JPEG data URIs."""
    counts = report.counts()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>finegrain duplicates</title>",
             f"<style>{_STYLE}</style></head><body><h1>Duplicates</h1>",
             (f"<p>{report.images} images; {counts['exact']} exact, {counts['near']} near and {counts['similar']} "
             f"similar groups. Thresholds: pixel match &ge; {report.near} (near, with embedding cosine &ge; "
              f"{report.candidate}), embedding cosine &ge; {report.similar} (similar); transforms: "
             f"{html.escape(', '.join(report.transforms) or 'none')}.</p>")]
    for n, group in enumerate(report.groups[:max_groups]):
        parts.append(f"<section class='{group['kind']}'><h2>{group['kind']} #{n + 1}: {len(group['ids'])} images, "
                     f"score {group['min_score']}&ndash;{group['max_score']}</h2><div class='imgs'>")
        for image_id, image_path in zip(group["ids"], group["paths"]):
            data = _thumbnail(image_path, thumb_side)
            img = (f"<img alt='image {image_id}' src='data:image/jpeg;base64,{data}'>" if data
                   else "<div class='missing'></div>")
            parts.append(f"<figure>{img}<figcaption>#{image_id} {html.escape(image_path)}</figcaption></figure>")
        parts.append("</div></section>")
    if len(report.groups) > max_groups:
        parts.append(f"<p>... and {len(report.groups) - max_groups} more groups (see --json).</p>")
    parts.append("</body></html>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as export --out does
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
