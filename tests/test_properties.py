"""Property tests (hypothesis, modest example counts): metrics, the store, the image loader, query decomposition.

The rules decomposer's own properties are in tests/test_query_decompose.py;
tools/stress/fuzz_images.py runs 10,000 generated files through the loader and indexing.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule
from PIL import Image

from finegrain.eval.metrics import compute_map, ndcg_at_k, ndcg_at_k_graded, recall_at_k

# ------------------------------------------------------------------------------------- metrics


@st.composite
def ranking_case(draw):
    """A database of n items, a ranking (permutation), positives and junk (disjoint)."""
    n = draw(st.integers(2, 40))
    perm = draw(st.permutations(list(range(n))))
    labels = draw(st.lists(st.sampled_from(["ok", "junk", "neg"]), min_size=n, max_size=n))
    if "ok" not in labels:
        labels[draw(st.integers(0, n - 1))] = "ok"
    return np.asarray(perm), labels


@settings(max_examples=150, deadline=None)
@given(case=ranking_case(), data=st.data())
def test_ap_is_in_unit_interval_and_ignores_how_negatives_and_junk_are_ordered(case, data):
    perm, labels = case
    ok = [i for i, lab in enumerate(labels) if lab == "ok"]
    junk = [i for i, lab in enumerate(labels) if lab == "junk"]
    gnd = [{"ok": ok, "junk": junk}]
    m, aps, _, prs = compute_map(perm[:, None], gnd, kappas=(1, 5))
    assert 0.0 <= m <= 1.0 + 1e-12 and np.all((prs >= 0) & (prs <= 1))
    # Shuffle the non-positive items among the slots they occupy: positives keep their places.
    slots = [r for r, item in enumerate(perm) if labels[item] == "neg"]
    items = [perm[r] for r in slots]
    shuffled = data.draw(st.permutations(items))
    other = perm.copy()
    other[slots] = shuffled
    assert compute_map(other[:, None], gnd)[0] == pytest.approx(m, abs=1e-12)
    # Junk is removed, so moving junk anywhere only matters through the positives' shifted ranks:
    # a ranking with every junk item moved to the end is at least as good.
    junk_last = np.array([i for i in perm if labels[i] != "junk"] + [i for i in perm if labels[i] == "junk"])
    assert compute_map(junk_last[:, None], gnd)[0] == pytest.approx(m, abs=1e-12)
    # All positives first is a perfect score; moving a positive down never helps.
    best = np.array(ok + [i for i in perm if i not in ok])
    assert compute_map(best[:, None], gnd)[0] == pytest.approx(1.0)
    assert m <= 1.0 + 1e-12


@settings(max_examples=100, deadline=None)
@given(ranks=st.lists(st.one_of(st.integers(0, 10_000).map(float), st.just(float("inf"))), min_size=1, max_size=50),
       k=st.integers(1, 100))
def test_recall_and_ndcg_bounds_and_monotone_in_k(ranks, k):
    r, n = recall_at_k(ranks, k), ndcg_at_k(ranks, k)
    assert 0.0 <= n <= r <= 1.0  # one relevant item: its gain is at most 1 and only counts when recalled
    assert recall_at_k(ranks, k + 1) >= r and ndcg_at_k(ranks, k + 1) >= n - 1e-12


@settings(max_examples=100, deadline=None)
@given(ranking=st.lists(st.integers(0, 30), max_size=30, unique=True),
       relevant=st.sets(st.integers(0, 30), min_size=1, max_size=10), k=st.integers(1, 40), data=st.data())
def test_graded_ndcg_bounds_and_irrelevant_permutation(ranking, relevant, k, data):
    v = ndcg_at_k_graded(ranking, relevant, k)
    assert 0.0 <= v <= 1.0 + 1e-12
    slots = [i for i, item in enumerate(ranking) if item not in relevant]
    shuffled = data.draw(st.permutations([ranking[i] for i in slots]))
    other = list(ranking)
    for i, item in zip(slots, shuffled):
        other[i] = item
    assert ndcg_at_k_graded(other, relevant, k) == pytest.approx(v)


# ---------------------------------------------------------------------------------- the store
DIM = 8


def _new_index(path: Path):
    """An index without an encoder: catalog settings as Index.create writes them, for vector-level tests."""
    from finegrain import Index
    from finegrain.store.catalog import Catalog

    path.mkdir(parents=True)
    catalog = Catalog(path, create=True)
    for key, value in {"encoder": "none", "dim": DIM, "ann": "flat", "segments": None}.items():
        catalog.set_meta(key, value)
    catalog.close()
    return Index.open(path)


class StoreMachine(RuleBasedStateMachine):
    """Random add / remove / compact / reopen / crash-leftover sequences against a dict model."""

    ids = Bundle("ids")

    def __init__(self):
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="fg-store-")
        self.index = _new_index(Path(self.tmp.name) / "index")
        self.model: dict[int, tuple[str, np.ndarray]] = {}
        self.ever: set[int] = set()
        self.counter = 0

    def teardown(self):
        self.index.close()
        self.tmp.cleanup()

    @rule(target=ids, n=st.integers(1, 4), seed=st.integers(0, 2**16))
    def add(self, n, seed):
        from finegrain.store.catalog import NewImage
        from finegrain.store.vectors import FieldRows

        rng = np.random.default_rng(seed)
        vecs = rng.standard_normal((n, DIM)).astype(np.float32)
        images = []
        for _ in range(n):
            self.counter += 1
            images.append(NewImage(f"/photos/img{self.counter}.jpg", f"{self.counter:064x}", 10, 1, 4, 3))
        with self.index.writer() as w:
            w.commit(images, {"global": FieldRows(vecs, np.arange(n))}, [], [], [])
        self.index.refresh()
        new = sorted(set(self.index.records) - set(self.model))
        assert len(new) == n and not (set(new) & self.ever), "ids are fresh, never reused"
        by_path = {self.index.records[i].path: i for i in new}
        added = []
        for im, vec in zip(images, vecs):
            image_id = by_path[im.path]
            self.model[image_id] = (im.path, vec)
            self.ever.add(image_id)
            added.append(image_id)
        return multiple(*added)

    @rule(image_id=consumes(ids))
    def remove(self, image_id):
        if image_id in self.model:
            self.index.remove([image_id])
            del self.model[image_id]

    @rule()
    def compact(self):
        self.index.compact()

    @rule()
    def reopen(self):
        from finegrain import Index

        self.index.close()
        self.index = Index.open(self.index.path)

    @rule(n=st.integers(1, 3))
    def crash_leftover(self, n):
        """A chunk written but never committed (a writer killed before its transaction)."""
        from finegrain.store.vectors import FieldRows, new_chunk_name, write_chunk

        rows = FieldRows(np.ones((n, DIM), np.float32), np.arange(10**6, 10**6 + n))
        write_chunk(self.index.path, "global", new_chunk_name(), rows)

    @invariant()
    def matches_model(self):
        from finegrain import Index

        for index in (self.index, Index.open(self.index.path)):
            assert set(index.records) == set(self.model)
            owners = [int(o) for o in index.global_rows.owners]
            assert len(owners) == len(set(owners)) == len(self.model)
            for row, owner in enumerate(owners):
                path, vec = self.model[owner]
                assert index.records[owner].path == path
                np.testing.assert_array_equal(np.asarray(index.global_rows.vectors[row]), vec)
            if self.model:  # search returns known ids, each once
                scores, found = index.search_vectors(np.ones((1, DIM), np.float32), k=len(self.model) + 2)
                live = found[0][found[0] >= 0]
                assert set(live.tolist()) == set(self.model) and len(live) == len(self.model)
            if index is not self.index:
                index.close()


TestStore = StoreMachine.TestCase
TestStore.settings = settings(max_examples=12, stateful_step_count=12, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------- the image loader
def _seed_images() -> list[bytes]:
    from skimage import data

    base = Image.fromarray(data.chelsea()).resize((48, 32))
    out = []
    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "CMYK"),
                      ("WEBP", "RGB"), ("PNG", "I;16")):
        buf = io.BytesIO()
        img = base.convert("L").convert("I;16") if mode == "I;16" else base.convert(mode)
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_images()


def _check_loader(data: bytes) -> None:
    from finegrain.images import ImageLoadError, load_image_sized

    try:
        img, (w, h) = load_image_sized(data, max_pixels=4_000_000, draft_size=16)
    except ImageLoadError as exc:
        assert str(exc) and "\n" not in str(exc)  # a one-line reason
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0 and w * h <= 4_000_000


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048))
def test_loader_random_bytes_give_an_image_or_image_load_error(data):
    _check_loader(data)


@settings(max_examples=250, deadline=None)
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12),
       cut=st.one_of(st.none(), st.integers(0, 4000)))
def test_loader_mutated_real_images_give_an_image_or_image_load_error(seed, edits, cut):
    buf = bytearray(seed)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if cut is not None:
        buf = buf[:cut]
    _check_loader(bytes(buf))


# ------------------------------------------------------------------------------ decomposition
@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=3000))
def test_decompose_query_any_unicode_is_bounded(text):
    """Any code points (surrogates, controls, RTL marks): no crash, full query first, bounded parts."""
    from finegrain.decompose.query import RulesDecomposer, decompose_query

    if not text.strip():
        return
    decomposer = RulesDecomposer()
    out = decompose_query(text, decomposer)
    assert out[0] == text and len(out) <= 1 + decomposer.max_parts
    assert all(isinstance(p, str) and p for p in out)
    json.dumps(out)  # serialisable for the API
