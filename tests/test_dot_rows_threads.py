"""``dot_rows`` on read-only memory-mapped rows: shared memory, no warning, thread-safe (no global filter changes).

Python's warning filters are one list per process: a ``warnings.catch_warnings()`` per call, from several
threads (the HTTP service scores concurrent queries), can restore another thread's filters.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
from rounding_helpers import assert_dots_close

from finegrain.compress import storage

DTYPES = ("float32", "float16", "int8")


def _mapped(tmp_path, name: str, array: np.ndarray) -> np.ndarray:
    """``array`` saved as .npy and mapped back read-only (how the index hands rows to the retrievers)."""
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    mapped = np.load(path, mmap_mode="r")
    assert not mapped.flags.writeable
    return mapped


def _rows(rng: np.random.Generator, n: int, d: int, dtype: str) -> np.ndarray:
    if dtype == "int8":
        return rng.integers(-127, 128, (n, d)).astype(np.int8)
    return rng.standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_view_shares_read_only_memory(tmp_path, dtype):
    rows = _mapped(tmp_path, dtype, _rows(np.random.default_rng(0), storage.SCORE_BLOCK_ROWS, 512, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns once per process: whichever call comes first
        tensor = storage.tensor_view(rows)
    assert tensor.data_ptr() == rows.ctypes.data  # the mapped block itself, never a copy
    assert tuple(tensor.shape) == rows.shape and str(tensor.dtype) == f"torch.{dtype}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_rows_score_as_writable_ones(tmp_path, dtype):
    rng = np.random.default_rng(1)
    rows = _rows(rng, 2 * storage.SCORE_BLOCK_ROWS + 123, 64, dtype)
    q = rng.standard_normal((3, 64)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    mapped = _mapped(tmp_path, dtype, rows)
    # bit-identical to the writable path (torch.from_numpy, as before) and to one matmul within rounding
    np.testing.assert_array_equal(storage.dot_rows(mapped, q, bias), storage.dot_rows(rows.copy(), q, bias))
    assert_dots_close(storage.dot_rows(mapped, q), rows, q)


def test_concurrent_calls_leave_the_warning_filters_alone(tmp_path):
    rng = np.random.default_rng(2)
    # integer-valued rows and queries: every product and sum is exact in float32, so any order gives numpy's bits;
    # small arrays (many calls, the scoring pool shared) and one of five blocks (the pool's workers split it)
    shapes = {dtype: (256, 32) for dtype in DTYPES} | {"int8-blocks": (4 * storage.SCORE_BLOCK_ROWS + 7, 32)}
    mapped = {name: _mapped(tmp_path, name, rng.integers(-20, 21, shape).astype(name.split("-")[0]))
              for name, shape in shapes.items()}
    queries = rng.integers(-3, 4, (4, 32)).astype(np.float32)
    expected = {name: np.asarray(rows, np.float32) @ queries.T for name, rows in mapped.items()}
    storage.dot_rows(mapped["int8"], queries)  # first call: whatever is set up once is set up now
    changed: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:  # the filters as every other thread of the process sees them, during the calls
        while not stop.is_set():
            if warnings.filters is not filters or warnings.filters != before:
                changed.append("the warning filters changed during a call")
                return

    def score(name: str, calls: int) -> None:
        try:
            for _ in range(calls):
                np.testing.assert_array_equal(storage.dot_rows(mapped[name], queries), expected[name])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    watcher = threading.Thread(target=watch)
    workers = [threading.Thread(target=score, args=(name, 10 if name == "int8-blocks" else 400))
               for name in [*DTYPES, *DTYPES, "int8-blocks"]]
    switch = sys.getswitchinterval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters, before = warnings.filters, list(warnings.filters)
        sys.setswitchinterval(1e-6)  # threads take turns within a call, as they may under load
        try:
            watcher.start()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            stop.set()
            watcher.join()
            sys.setswitchinterval(switch)
        assert not errors, errors[0]
        assert not changed
        assert warnings.filters is filters and warnings.filters == before
    assert not [w for w in caught if "not writable" in str(w.message)]


FRESH = """
import threading
import warnings

import numpy as np
import torch

from finegrain.compress import storage

if {old_dlpack}:  # as with numpy < 2.1 or an older torch: read-only arrays have no DLPack export
    def no_read_only(array, **kwargs):
        raise BufferError("Cannot export readonly array since signalling readonly is unsupported by DLPack.")
    torch.from_dlpack = no_read_only
warnings.simplefilter("error")  # a warning that escapes fails the script
rows = np.load({path!r}, mmap_mode="r")
queries = np.load({queries!r}, mmap_mode="r")  # a stored row as the query: read-only too
filters = list(warnings.filters)
assert storage.tensor_view(rows).data_ptr() == rows.ctypes.data
assert list(warnings.filters) == filters, "tensor_view changed the warning filters"
outs = []
threads = [threading.Thread(target=lambda: outs.append(storage.dot_rows(rows, queries)))
           for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(outs) == 4 and all(out[1, 0] == sum(range(8, 16)) for out in outs), outs
assert list(warnings.filters) == filters, "dot_rows changed the warning filters"
"""


@pytest.mark.parametrize("old_dlpack", [False, True], ids=["dlpack", "no-read-only-dlpack"])
def test_no_warning_in_a_fresh_process(tmp_path, old_dlpack):
    """torch warns about a read-only array once per process: only a fresh interpreter shows whether it would."""
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(64 * 8, dtype=np.int8).reshape(64, 8))
    np.save(tmp_path / "queries.npy", np.ones((1, 8), np.float32))
    script = FRESH.format(old_dlpack=old_dlpack, path=str(path), queries=str(tmp_path / "queries.npy"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
