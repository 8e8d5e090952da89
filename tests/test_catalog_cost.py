"""The catalog's per-image statements search indexes: adding images costs the same on a large catalog."""

from __future__ import annotations

from pathlib import Path

from finegrain.store.catalog import Catalog, NewImage


def _image(i: int) -> NewImage:
    return NewImage(path=f"/photos/{i:07d}.jpg", sha256=f"{i:064x}", size=1, mtime_ns=0, width=4, height=4)


def _add(catalog: Catalog, tx, n: int) -> None:
    ids = catalog.reserve_ids(n)
    tx.add_images(ids, [_image(i) for i in ids])


def _steps_to_add(catalog: Catalog, n: int) -> int:
    """SQLite virtual-machine steps (in thousands) spent adding ``n`` images, and recording a failure."""
    steps = [0]
    failed = f"/photos/failed-{sum(catalog.counts().values())}.jpg"

    def count() -> int:
        steps[0] += 1
        return 0

    catalog.db.set_progress_handler(count, 1000)
    with catalog.transaction() as tx:
        _add(catalog, tx, n)
        tx.add_failure(failed, "not an image")
    catalog.db.set_progress_handler(None, 1000)
    return steps[0]


def test_adding_images_does_not_scan_the_table(tmp_path: Path):
    """The failure-row cleanup once scanned every row per added image: adding n images was quadratic."""
    catalog = Catalog(tmp_path, create=True)
    small = _steps_to_add(catalog, 200)
    with catalog.transaction() as tx:  # grow the catalog 100x
        _add(catalog, tx, 20_000)
    large = _steps_to_add(catalog, 200)
    assert large <= 2 * small + 5, (small, large)  # a scan per image made it 160x (78 -> 12,503)
    assert catalog.counts() == {"indexed": 20_400, "failed": 2}
    catalog.close()
