"""HTML benchmark reports: metric tables and plots in one self-contained file.

``finegrain bench ... --report out.html`` and ``finegrain tune ... --report``
call :func:`write_report` with the run's metrics and a :class:`ReportData`
of raw per-query material (latencies, ranks of the relevant items,
precision-recall curves, finished PNGs such as the tune Pareto plot). Plots
are drawn with matplotlib and embedded as base64 PNGs, so the report is one
file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Recall levels at which precision-recall curves are sampled (interpolated precision).
RECALL_LEVELS = np.linspace(0.0, 1.0, 21)


@dataclass
class ReportData:
    """Per-query material a benchmark collects for its report (all optional)."""

    latencies_ms: list[float] = field(default_factory=list)
    #: Label -> 0-based rank of the first relevant item per query (``inf`` when not retrieved).
    first_relevant_ranks: dict[str, np.ndarray] = field(default_factory=dict)
    #: Label -> (recall levels, mean interpolated precision).
    pr_curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: Caption -> a PNG already on disk (for example the tune Pareto plot).
    images: dict[str, Path] = field(default_factory=dict)
    #: Extra tables: caption -> list of rows (dicts with the same keys).
    tables: dict[str, list[dict]] = field(default_factory=dict)


def interpolated_pr(ranked_relevance: Sequence[np.ndarray], n_relevant: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean interpolated precision at :data:`RECALL_LEVELS` over queries.

    ``ranked_relevance[q]`` is a 0/1 array over query ``q``'s ranking (junk
    already removed); ``n_relevant[q]`` its number of relevant items.
    Interpolated precision at recall r is the best precision at any recall
    >= r (the usual 11-point-style convention, here at 21 points).
    """
    curves = []
    for rel, n in zip(ranked_relevance, n_relevant):
        if n <= 0:
            continue
        rel = np.asarray(rel, dtype=np.float64)
        hits = np.cumsum(rel)
        precision = hits / np.arange(1, len(rel) + 1)
        recall = hits / n
        best_after = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at this position or later
        curve = np.array([best_after[recall >= r].max() if (recall >= r).any() else 0.0 for r in RECALL_LEVELS])
        curves.append(curve)
    if not curves:
        raise ValueError("no query has relevant items")
    return RECALL_LEVELS.copy(), np.mean(curves, axis=0)


def revisitop_pr(ranks: np.ndarray, protocol: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve of a revisitop protocol (``ok``/``junk`` per query) from a (n_db, n_queries) ranking."""
    relevance, counts = [], []
    for q, g in enumerate(protocol):
        ok, junk = set(map(int, g["ok"])), set(map(int, g["junk"]))
        order = [int(i) for i in ranks[:, q] if int(i) not in junk]
        relevance.append(np.array([i in ok for i in order]))
        counts.append(len(ok))
    return interpolated_pr(relevance, counts)


def single_relevant_pr(first_ranks: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve when each query has exactly one relevant item at 0-based rank ``first_ranks[q]``."""
    relevance = []
    for r in np.asarray(first_ranks, dtype=np.float64):
        rel = np.zeros(max(n_items, 1), bool)
        if np.isfinite(r) and r < n_items:
            rel[int(r)] = True
        relevance.append(rel)
    return interpolated_pr(relevance, [1] * len(relevance))


def write_report(path: str | Path, title: str, metrics: dict, data: ReportData | None = None,
                 command: str | None = None) -> Path:
    """Write a self-contained HTML report; returns its path."""
    data = data or ReportData()
    figures: list[tuple[str, str]] = []  # (caption, base64 PNG)
    if data.pr_curves:
        figures.append(("Precision-recall", _png(_plot_pr(data.pr_curves))))
    if data.first_relevant_ranks:
        figures.append(("Recall@K", _png(_plot_recall_at_k(data.first_relevant_ranks))))
    if data.latencies_ms:
        figures.append(("Query latency", _png(_plot_latency(data.latencies_ms))))
    for caption, png in data.images.items():
        png = Path(png)
        if png.is_file():
            figures.append((caption, base64.b64encode(png.read_bytes()).decode("ascii")))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
             "th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
             "figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-weight:600}"
             "code{background:#f6f6f6;padding:1px 4px}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by finegrain."
             + (f" Command: <code>{html.escape(command)}</code>" if command else "") + "</p>",
             "<h2>Metrics</h2>",
             _table([{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, (dict, list))])]
    for caption, rows in data.tables.items():
        parts += [f"<h2>{html.escape(caption)}</h2>", _table(rows)]
    if figures:
        parts.append("<h2>Plots</h2>")
        parts += [f"<figure><figcaption>{html.escape(c)}</figcaption><img alt='{html.escape(c)}' "
                  f"src='data:image/png;base64,{b}'></figure>" for c, b in figures]
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a report
    return path


def _table(rows: list[dict]) -> str:
    if not rows:
        return "<p>(none)</p>"
    keys = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = []
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k, "")
            if isinstance(v, float):
                cells.append(f"<td class='num'>{v:.4g}</td>")
            elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                cells.append(f"<td class='num'>{v}</td>")
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(5.2, 3.6), dpi=110)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plot_pr(curves: dict[str, tuple[np.ndarray, np.ndarray]]):
    fig, ax = _figure()
    for label, (recall, precision) in curves.items():
        ax.plot(recall, precision, marker=".", label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("interpolated precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    return fig


def _plot_recall_at_k(ranks: dict[str, np.ndarray]):
    fig, ax = _figure()
    ks = np.unique(np.round(np.logspace(0, 2, 20)).astype(int))
    for label, r in ranks.items():
        r = np.asarray(r, dtype=np.float64)
        ax.plot(ks, [100 * float(np.mean(r < k)) for k in ks], marker=".", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 101)
    ax.legend(fontsize=8)
    return fig


def _plot_latency(latencies_ms: list[float]):
    fig, ax = _figure()
    lat = np.asarray(latencies_ms, dtype=np.float64)
    ax.hist(lat, bins=min(50, max(5, len(lat) // 10)), color="#4a7bb7")
    for q, style in ((50, "--"), (95, ":")):
        v = float(np.percentile(lat, q))
        ax.axvline(v, color="crimson", linestyle=style, label=f"p{q} {v:.1f} ms")
    ax.set_xlabel("latency per query (ms)")
    ax.set_ylabel("queries")
    ax.legend(fontsize=8)
    return fig
