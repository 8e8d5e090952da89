"""Pieces shared by the benchmarks: cached bench indexes."""

from __future__ import annotations

from pathlib import Path

from ..decompose.segments import SegmentConfig
from ..index import Index


def flickr8k_index_name(split: str, encoder: str, segments: SegmentConfig | None = None) -> str:
    """The cache folder name of a Flickr8k bench index (shared by ``bench flickr8k``, ``compress`` and ``scale``)."""
    name = f"flickr8k-{split}-{encoder.replace('/', '_').replace(':', '_')}"
    if segments is not None:
        name += f"-seg-{segments.embed}-{'_'.join(map(str, segments.levels))}-{segments.resolution}"
    return name


def bench_index(images: list[Path], encoder: str, index_dir: Path, show_progress: bool,
                segments: SegmentConfig | None = None, local=None, objects=None) -> tuple[Index, dict]:
    """Open the cached bench index for these images (building or updating it first).

    The index is reused when the files are unchanged (size/mtime/content hash);
    the indexing throughput measured when it was built is kept in the index.
    """
    index = Index.create(index_dir, encoder=encoder, segments=segments, exist_ok=True, local=local, objects=objects)
    report = index.add(images, remove_missing=False, show_progress=show_progress)
    speed = index.catalog.get_meta("bench_index_images_per_s")
    if report.indexed >= len(images) // 2 or speed is None:
        speed = report.images_per_s
        index.catalog.set_meta("bench_index_images_per_s", speed)
    return index, {"index_images_per_s": speed, "index_failed": len(report.failed), "index_reused": report.indexed == 0}
