"""What the HTTP service shares between request threads: the open index and a thumbnail cache.

FastAPI runs synchronous endpoints in a thread pool, so several requests use
the index at once. An :class:`~finegrain.Index` is read-only between loads,
but its own reload (``Index.refresh``) rebuilds its attributes one by one, so
a search running beside it could see half an old and half a new index. The
holder never reloads an index in place: when the catalog's generation
changes (``finegrain index`` committed in another process) it opens a *new*
``Index`` (sharing the already loaded encoder) and swaps the reference. Each
request works on the index it leased at its start; a replaced index is
closed when its last lease ends. Every index the holder opens shares one
encoder, which batches the text queries of concurrent requests.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import encoders
from ..images import MAX_PIXELS, ImageLoadError, load_thumbnail
from ..index import Index
from ..store.catalog import CATALOG_NAME, Catalog
from .batching import BatchingEncoder
from .lease import ReloadingHolder

log = logging.getLogger("finegrain.service")


class IndexHolder(ReloadingHolder[Index]):
    """The service's current index, re-opened when another process commits to it.

    Parameters
    ----------
    path:
        The index folder.
    reload_interval:
        Seconds between two checks of the catalog generation (0: check on
        every request). A check is one small SQLite read.
    text_workers:
        Threads embedding text queries, batched across requests (see
        :class:`~finegrain.service.batching.BatchingEncoder`); default one per core.
    """

    def __init__(self, path: str | os.PathLike, reload_interval: float = 1.0, text_workers: int | None = None):
        self.path = Path(path)
        self.text_workers = text_workers
        self._encoder_name: str | None = None
        super().__init__(self._open(), Index.close, reload_interval)
        self._probe = Catalog(self.path)
        self._catalog_file = _file_id(self.path)  # a replaced index (deleted and rebuilt) is a new file

    def _open(self) -> Index:
        """Open the index with the service's shared, batching encoder (one model load for every re-open)."""
        with Catalog(self.path) as probe:
            name = probe.get_meta("encoder")
        if self.encoder is None or name != self._encoder_name:  # (a replaced one may still serve old leases)
            self.encoder = BatchingEncoder(lambda: encoders.create(name), workers=self.text_workers)
            self._encoder_name = name
        return Index.open(self.path, encoder=self.encoder)  # type: ignore[arg-type]

    @property
    def generation(self) -> int:
        return self._leases.current.generation

    def _reload(self) -> bool:
        """Re-open the index if its catalog generation changed (or the catalog file was replaced)."""
        try:
            file_id = _file_id(self.path)
            if file_id != self._catalog_file:  # deleted and built anew: its generation restarted at 1
                self._probe.close()
                self._probe = Catalog(self.path)
            elif self._probe.generation() == self.generation:
                return False
        except Exception as exc:  # noqa: BLE001 - e.g. the folder vanished: keep serving what is loaded
            log.warning("could not read the generation of the index at %s: %s", self.path, exc)
            return False
        try:
            new = self._open()
        except Exception as exc:  # keep serving what we have
            log.warning("could not re-open the index at %s: %s", self.path, exc)
            return False
        self._leases.swap(new)
        self._catalog_file = file_id
        self.reloads += 1
        log.info("re-opened the index at %s: generation %d, %d images", self.path, new.generation, len(new))
        return True

    def _close_probes(self) -> None:
        self._probe.close()


def decode_slots() -> int:
    """How many images the service decodes at once: one per core, at most what memory allows.

    A decode of an allowed image can take ``MAX_PIXELS`` x 4 bytes (RGBA) plus
    the file; a quarter of the machine's memory is given to decoding.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 4 * 2**30
    return max(1, min(cores, 8, memory // 4 // (MAX_PIXELS * 4 + 2**28)))


class DecodePool:
    """A few dedicated threads that do all of the service's image decoding.

    Bounds how many images are decoded at once (``decode_slots()``), and
    keeps the decoding in the same few threads: each thread's malloc arena
    keeps the memory of its largest decode, so decoding in each of the 40
    request threads in turn would keep 40 such peaks resident.
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers or decode_slots()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="finegrain-decode")

    def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a decode thread; waits for it and returns its result (or raises)."""
        return self._pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _file_id(path: Path) -> tuple[int, int]:
    """(device, inode) of an index's catalog file: changes when the index is replaced by a new one."""
    st = os.stat(Path(path) / CATALOG_NAME)
    return st.st_dev, st.st_ino


class ThumbnailCache:
    """JPEG thumbnails of indexed images by id, made from the catalog's stored path, kept in an LRU.

    Keyed by (id, content hash): a re-indexed file gets a fresh thumbnail.
    Decoding runs on ``decoder`` (shared with the service's other image decodes).
    """

    def __init__(self, size: int = 256, capacity: int = 512, quality: int = 85,
                 decoder: DecodePool | None = None):
        self.size = int(size)
        self.capacity = int(capacity)
        self.quality = int(quality)
        self.decoder = decoder or DecodePool()
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: Index, image_id: int) -> bytes:
        """The thumbnail's JPEG bytes; ``KeyError`` for an unknown id, ``ImageLoadError`` for an unreadable file."""
        record = index.get(image_id)
        key = (record.id, record.sha256)
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
                return data
        data = self.decoder.run(self._make, record.path)  # outside the cache lock: decoding is the slow part
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return data

    def _make(self, path: str) -> bytes:
        img = load_thumbnail(path, self.size)
        buf = io.BytesIO()
        try:
            img.save(buf, "JPEG", quality=self.quality)
        except OSError as exc:
            raise ImageLoadError(f"cannot encode thumbnail: {exc}") from None
        return buf.getvalue()
