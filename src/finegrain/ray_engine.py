"""Indexing with Ray Data: decode and encode as distributed batch jobs, merged into the usual index.

``finegrain index DIR --index PATH --engine ray [--address ADDR]`` runs the
same pipeline as :class:`finegrain.indexer.Indexer`, spread over a Ray
cluster (a local Ray runtime on one machine):

1. the driver walks the inputs and skips unchanged files (as the local engine does);
2. field extractors with learned state (the local-feature whitening) are
   fitted on the driver, their state saved under the index folder;
3. ``map_batches`` tasks read, hash and decode the images and run every field
   extractor's ``prepare`` (:mod:`finegrain.fields`: SLIC segments, object
   crops, local-feature image regions...);
4. an actor pool holding the encoder runs every extractor's ``encode`` on each
   batch and writes it as a *shard* under ``PATH/staging/<run>/``: vector
   chunks in the index's own ``.npy`` layout, rows owned by positions in the
   shard, plus a JSON manifest;
5. the driver merges finished shards, in input order, into the index through
   the same commit step as the local engine (chunks written, then one catalog
   transaction), ``commit_every`` images at a time, and deletes them.

Both engines run the same extractor list, so the Ray engine builds every
field the local one does. Because shards are merged in input order, image ids
come out exactly as the local engine assigns them. A killed run leaves only
staging files, which the next run deletes; nothing half-merged is ever
visible to readers.

On a multi-node cluster (``--address ray://head:10001`` or ``auto``) the
index folder must be on storage every node can write (NFS, a mounted bucket),
because actors write shards under it and workers read fitted extractor state
from it; the driver then only reads manifests and chunk files. Ray is an
optional extra: ``pip install 'finegrain[ray]'``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import numpy as np

from .fields import FieldExtractor
from .indexer import Indexer, IndexReport, Pending, Prepared, prepare_file
from .progress import progress_bar
from .store.catalog import ImageRecord, NewImage
from .store.vectors import FieldRows, new_chunk_name, read_chunk, write_chunk

if TYPE_CHECKING:  # pragma: no cover
    from .store.writer import Writer

STAGING_DIR = "staging"


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the ray engine needs Ray Data: pip install 'finegrain[ray]' "
                           "(or pip install 'ray[data]')") from exc
    return ray


class RayIndexer(Indexer):
    """An :class:`Indexer` whose decoding and encoding run as Ray Data batch jobs.

    ``address``: a Ray cluster address (``auto``, ``ray://host:10001``), or
    ``None`` to start a local runtime with ``num_cpus`` CPUs (default: all).
    ``actors``: size of the encoder actor pool (default: one per
    ``cpus_per_actor`` CPUs, at least one). Each actor runs torch with
    ``cpus_per_actor`` threads; decode tasks take one CPU each.
    """

    def __init__(self, writer: Writer, batch_size: int = 32, commit_every: int = 512, address: str | None = None,
                 num_cpus: int | None = None, actors: int | None = None, cpus_per_actor: int | None = None,
                 stop: threading.Event | None = None, on_commit: Callable[[int], None] | None = None):
        super().__init__(writer, batch_size=batch_size, commit_every=commit_every, workers=0, stop=stop,
                         on_commit=on_commit)
        self.address = address
        self.num_cpus = num_cpus
        self.actors = actors
        self.cpus_per_actor = cpus_per_actor

    def run(self, inputs: Sequence[str | os.PathLike], recursive: bool = True, remove_missing: bool = False,
            show_progress: bool = True) -> IndexReport:
        ray = _require_ray()
        t0 = time.perf_counter()
        report, files, known, todo = self.plan(inputs, recursive)
        staging = self.writer.path / STAGING_DIR
        shutil.rmtree(staging, ignore_errors=True)  # shards of a killed earlier run
        if not todo:
            return self._finish(report, inputs, files, known, remove_missing, t0)

        extractors = self.extractors()
        for ex in extractors:
            if ex.needs_fit:  # on the driver, first: workers read the saved state from the index folder
                ex.fit(todo, show_progress)
        # What workers get: copies as pickling makes them (the fit's in-memory caches are not kept here either).
        extractors = [copy.copy(ex) for ex in extractors]

        started_here = not ray.is_initialized()
        for name in ("ray", "ray.data"):  # keep Ray's per-run INFO lines out of the CLI's output
            logging.getLogger(name).setLevel(logging.WARNING)
        if started_here:
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            run_dir = staging / uuid.uuid4().hex
            run_dir.mkdir(parents=True)
            shards = self._shards(ray, todo, known, run_dir, extractors)
            with progress_bar(len(todo), "indexing (ray)", show_progress) as bar:
                merger = _Merger(self.writer, known, self.commit_every, self.after_commit)
                for shard in shards:
                    if self.stopping():  # asked to stop: commit what is merged, leave the rest to the next run
                        report.stopped = True
                        break
                    done = merger.add(Path(shard))
                    report.failed.extend(done.failed)
                    report.unchanged += done.unchanged
                    bar.advance(done.files)
                shards.close()  # a stopped run: end the pipeline's iteration here
                merger.flush()
                report.indexed += merger.committed
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if started_here:
                ray.shutdown()
        return self._finish(report, inputs, files, known, remove_missing, t0)

    def _shards(self, ray, todo: list[str], known: Mapping[str, ImageRecord], run_dir: Path,
                extractors: list[FieldExtractor]):
        """Run the Ray Data pipeline; yields shard folders in input order as they finish."""
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        per_actor = self.cpus_per_actor or max(1, cpus // 2 if cpus > 2 else cpus - 1)
        actors = self.actors or max(1, cpus // (per_actor + 1))
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # merge order == input order == local engine's ids
        ctx.enable_progress_bars = False
        encoder = self.writer.catalog.get_meta("encoder")
        items = [{"path": p,
                  "known_sha": (known[p].sha256 or "") if p in known and known[p].status == "indexed" else ""}
                 for p in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items) // self.batch_size))
        # The extractors travel pickled by Ray (our own objects between our own processes), without heavy state.
        ds = ds.map_batches(_decode_batch, batch_size=self.batch_size, num_cpus=1,
                            fn_kwargs={"encoder": encoder, "extractors": extractors})
        ds = ds.map_batches(_ShardWriter, batch_size=self.batch_size, num_cpus=per_actor,
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"encoder": encoder, "extractors": extractors,
                                                   "run_dir": str(run_dir), "threads": per_actor})
        for row in ds.iter_rows():
            yield row["shard"]


def _decode_batch(batch: dict, encoder: str, extractors: list[FieldExtractor]) -> dict:
    """Ray task: read, hash and decode a batch of files and run every extractor's ``prepare`` -> prepared items."""
    from . import encoders

    enc = encoders.create(encoder)  # cached per worker process
    out = []
    for path, sha in zip(batch["path"], batch["known_sha"]):
        known = SimpleNamespace(status="indexed", sha256=str(sha)) if sha else None  # what prepare_file reads
        out.append(prepare_file(str(path), enc, cast(ImageRecord | None, known), extractors))
    return {"item": np.array(out, dtype=object)}


class _ShardWriter:
    """Ray actor: run every extractor's ``encode`` on prepared items and write them as one shard."""

    def __init__(self, encoder: str, extractors: list[FieldExtractor], run_dir: str, threads: int):
        import torch

        from . import encoders

        torch.set_num_threads(max(1, threads))
        self.encoder = encoders.create(encoder)
        self.extractors = extractors
        self.run_dir = Path(run_dir)

    def __call__(self, batch: dict) -> dict:
        pending = Pending(self.extractors)
        manifest: dict = {"images": [], "failures": [], "touches": []}
        for item in batch["item"]:
            if item.error is not None:
                manifest["failures"].append(_failure(item))
            elif item.payloads is None:  # same content as the indexed file, new mtime
                manifest["touches"].append({"path": item.path, "mtime_ns": item.mtime_ns})
            else:
                pending.add(item)
        manifest["failures"] += [_failure(item) for item in pending.encode(self.encoder)]
        manifest["images"] = [img.__dict__ for img in pending.images]
        shard = self.run_dir / f"{new_chunk_name()}-{uuid.uuid4().hex[:8]}"
        shard.mkdir()
        manifest["fields"] = {}
        for field, rows in pending.field_rows().items():
            name = new_chunk_name()
            write_chunk(shard, field, name, rows)
            manifest["fields"][field] = name
        (shard / "manifest.json").write_text(json.dumps(manifest))  # last: a shard without it is incomplete
        return {"shard": np.array([str(shard)], dtype=object)}


def _failure(item: Prepared) -> dict:
    return {"path": item.path, "error": item.error, "size": item.size, "mtime_ns": item.mtime_ns}


class _ShardResult:
    def __init__(self):
        self.files = 0
        self.unchanged = 0
        self.failed: list[tuple[str, str]] = []


class _Merger:
    """Accumulates shards on the driver and commits them ``commit_every`` images at a time."""

    def __init__(self, writer: Writer, known: Mapping[str, ImageRecord], commit_every: int,
                 on_commit: Callable[[int], None]):
        self.writer = writer
        self.on_commit = on_commit
        self.known = known
        self.commit_every = commit_every
        self.committed = 0
        self._reset()

    def _reset(self) -> None:
        self.images: list[NewImage] = []
        self.fields: dict[str, list[FieldRows]] = {}
        self.failures: list = []
        self.touches: list[tuple[int, int]] = []
        self.removals: list[int] = []
        self.shards: list[Path] = []

    def add(self, shard: Path) -> _ShardResult:
        manifest = json.loads((shard / "manifest.json").read_text())
        result = _ShardResult()
        offset = len(self.images)
        for img in manifest["images"]:
            rec = self.known.get(img["path"])
            if rec is not None and rec.status == "indexed":
                self.removals.append(rec.id)  # content changed: replace the old entry
            self.images.append(NewImage(**img))
        for field, name in manifest["fields"].items():
            rows = read_chunk(shard, field, name)
            self.fields.setdefault(field, []).append(
                FieldRows(np.asarray(rows.vectors), rows.owners + offset, rows.attrs))
        for f in manifest["failures"]:
            self.failures.append(Prepared(f["path"], f["size"], f["mtime_ns"], error=f["error"]))
            result.failed.append((f["path"], f["error"]))
        for t in manifest["touches"]:
            self.touches.append((self.known[t["path"]].id, t["mtime_ns"]))
        result.unchanged = len(manifest["touches"])
        result.files = len(manifest["images"]) + len(manifest["failures"]) + len(manifest["touches"])
        self.shards.append(shard)
        if len(self.images) >= self.commit_every:
            self.flush()
        return result

    def flush(self) -> None:
        """Commit what has accumulated (the caller holds the index's writer lock), then drop those shards."""
        if self.images or self.failures or self.touches:
            fields = {f: FieldRows.concat(parts, parts[0].vectors.shape[1]) for f, parts in self.fields.items()}
            added = self.writer.commit(self.images, fields, self.failures, self.touches, self.removals)
            self.committed += added
            self.on_commit(added)
        for shard in self.shards:
            shutil.rmtree(shard, ignore_errors=True)
        self._reset()

