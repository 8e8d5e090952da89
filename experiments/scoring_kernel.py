"""Scoring kernel: numpy's one-shot matmul (the first ``dot_rows``), torch over cache-sized blocks on torch's
own threads (the second), and today's: the same blocks on a pool of single-threaded workers.

Random unit rows shaped like a 10,000-image segment field (780,000 x 512), 5 query vectors, stored as
float32, float16 and int8; median of 5 runs each, in one process (ratios within one run).

    python -m experiments.scoring_kernel [ROWS] [DIM]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from finegrain.compress.storage import dot_rows


def numpy_kernel(rows: np.ndarray, q: np.ndarray, block: int = 65_536) -> np.ndarray:
    """The old ``dot_rows``: one matmul for float32 rows, 65,536-row float32 conversions otherwise."""
    if rows.dtype == np.float32:
        return rows @ q.T
    out = np.empty((len(rows), len(q)), np.float32)
    for start in range(0, len(rows), block):
        out[start:start + block] = rows[start:start + block].astype(np.float32) @ q.T
    return out


def torch_threads_kernel(rows: np.ndarray, q: np.ndarray, block: int = 4_096) -> np.ndarray:
    """The second ``dot_rows``: 4,096-row blocks, each matmul parallelised by torch itself."""
    import torch

    out = np.empty((len(rows), len(q)), np.float32)
    result, qt = torch.from_numpy(out), torch.from_numpy(np.ascontiguousarray(q.T))
    source = torch.from_numpy(np.require(rows, requirements="W"))
    for a in range(0, len(rows), block):
        b = source[a:a + block]
        torch.matmul(b if b.dtype == torch.float32 else b.float(), qt, out=result[a:a + block])
    return out


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 780_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    q = rng.standard_normal((5, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    scale = np.abs(rows).max(axis=0) / 127
    stored = {"float32": rows, "float16": rows.astype(np.float16),
              "int8": np.clip(np.rint(rows / scale), -127, 127).astype(np.int8)}
    for dtype, r in stored.items():
        qq = q * scale if dtype == "int8" else q
        old, mid = median_ms(lambda: numpy_kernel(r, qq)), median_ms(lambda: torch_threads_kernel(r, qq))
        new = median_ms(lambda: dot_rows(r, qq))
        same = float(np.abs(numpy_kernel(r, qq) - dot_rows(r, qq)).max())
        print(json.dumps({"rows": n, "dim": dim, "dtype": dtype, "numpy_ms": round(old, 1),
                          "torch_threads_ms": round(mid, 1), "pool_ms": round(new, 1),
                          "speedup": round(old / new, 2), "max_abs_difference": same}))


if __name__ == "__main__":
    main()
