"""Comparing float32 dot products computed in different summation orders (torch blocks, BLAS, numpy)."""

from __future__ import annotations

import numpy as np


def assert_dots_close(got: np.ndarray, rows: np.ndarray, queries: np.ndarray, rel: float = 1e-6) -> None:
    """``got`` equals ``rows @ queries.T`` up to float32 rounding of the sum.

    The bound is per element, ``rel * sum_k |rows_ik| |queries_jk|``: a different summation order may change
    a result by a few float32 ulps *of its terms*, so a plain relative tolerance fails on sums that cancel
    to near zero (a CPU without the previous machine's vector width found such elements).
    """
    a = np.asarray(rows, np.float32)
    b = np.asarray(queries, np.float32)
    want = (a.astype(np.float64) @ b.astype(np.float64).T)
    bound = rel * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64).T) + 1e-30
    err = np.abs(np.asarray(got, np.float64) - want)
    assert got.shape == want.shape and np.all(err <= bound), f"max error / bound {float((err / bound).max()):.3g}"
