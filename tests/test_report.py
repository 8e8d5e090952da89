"""HTML reports: the precision-recall maths, and --report on bench revisitop and tune end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from finegrain.cli import app
from finegrain.report import RECALL_LEVELS, ReportData, interpolated_pr, revisitop_pr, single_relevant_pr, write_report

from test_bench_revisitop import tiny_revisitop  # noqa: F401  (module fixture reused)


def test_interpolated_pr_known_values():
    # Relevant at positions 0 and 3 of 4: precision 1, .5, .33, .5 at recall .5, .5, .5, 1.
    recall, precision = interpolated_pr([np.array([1, 0, 0, 1])], [2])
    assert np.allclose(recall, RECALL_LEVELS)
    assert np.allclose(precision[recall <= 0.5], 1.0) and np.allclose(precision[recall > 0.5], 0.5)
    # A relevant item never retrieved caps recall: precision 0 beyond what was found.
    _, precision = interpolated_pr([np.array([0, 1, 0])], [2])
    assert np.allclose(precision[RECALL_LEVELS <= 0.5], 0.5) and np.allclose(precision[RECALL_LEVELS > 0.5], 0.0)
    with pytest.raises(ValueError, match="no query"):
        interpolated_pr([np.array([0, 0])], [0])


def test_single_relevant_and_revisitop_pr():
    _, p = single_relevant_pr(np.array([0.0, 1.0, np.inf]), 10)
    assert np.allclose(p, (1 + 0.5 + 0) / 3)
    # Two queries over 4 database items; junk is skipped before precision is measured.
    ranks = np.array([[2, 0], [1, 1], [0, 2], [3, 3]])
    _, p = revisitop_pr(ranks, [{"ok": [0], "junk": [2]}, {"ok": [0], "junk": []}])
    assert np.allclose(p, (0.5 + 1.0) / 2)


def _images(html: str) -> list[str]:
    return re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)


def test_write_report_is_self_contained(tmp_path):
    data = ReportData(latencies_ms=[1.0, 2.0, 3.5], first_relevant_ranks={"t2i": np.array([0, 3, np.inf])},
                      pr_curves={"medium": interpolated_pr([np.array([1, 0, 1])], [2])},
                      tables={"trials <&>": [{"T": 0.5, "ndcg10": 0.41}]})
    path = write_report(tmp_path / "r" / "out.html", "a <title>", {"map_medium": 61.5, "queries": 3}, data)
    html = path.read_text()
    assert "a &lt;title&gt;" in html and "trials &lt;&amp;&gt;" in html and "61.5" in html
    assert len(_images(html)) == 3  # PR, recall@K, latency
    assert "http://" not in html and "https://" not in html  # opens offline


def test_bench_revisitop_report(tiny_revisitop, photos_dir, tmp_path):  # noqa: F811
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["bench", "revisitop", "--data", str(tiny_revisitop), "--distractors", str(photos_dir),
                                   "--cache-dir", str(tmp_path / "cache"), "--json", "--report", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    html = out.read_text()
    assert f"{metrics['map_medium']:.4g}" in html
    assert len(_images(html)) == 2  # Easy/Medium/Hard precision-recall, latency histogram


def test_tune_report_embeds_the_pareto_plot(tmp_path, photos_dir):
    from finegrain.decompose.segments import SegmentConfig
    from finegrain.index import Index

    index = Index.create(tmp_path / "seg", segments=SegmentConfig(levels=(1, 4)))
    index.add([photos_dir], show_progress=False)
    index.close()
    queries = tmp_path / "q.jsonl"
    queries.write_text("\n".join(json.dumps({"text": t, "relevant": [n]}) for t, n in [
        ("a cat", "chelsea.jpg"), ("coins on a table", "coins.jpg"), ("a cup of coffee", "coffee.jpg")]))
    out = tmp_path / "tune.html"
    res = CliRunner().invoke(app, ["tune", "--index", str(tmp_path / "seg"), "--queries", str(queries),
                                   "--report", str(out)])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "all trials" in html and "chosen_T" in html
    assert len(_images(html)) == 1  # the accuracy-latency plot written by tune
