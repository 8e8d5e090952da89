"""finegrain tune picks the candidate-stage size: top-10 agreement with exhaustive search, latency, budget."""

from __future__ import annotations

import json

import numpy as np
import pytest
from random_index_helpers import random_segmented_index
from random_index_helpers import unit as _unit

from finegrain import tune as tune_mod
from finegrain.index import Index
from finegrain.retrieval import Query
from finegrain.retrieval import multivector as mvr
from finegrain.search import multivector as mv
from finegrain.tune import CandidateTrial, choose_candidates, tune, tune_candidates

N = 120


@pytest.fixture()
def index(tmp_path):
    """120 images with random unit vectors: a global vector and 1 + 4 segments each."""
    idx = random_segmented_index(tmp_path / "idx", N, seed=3, levels=(1, 4))
    yield idx
    idx.close()


def test_choose_candidates_budget_and_slack():
    trials = [CandidateTrial(0, 1.0, 9.0, 900), CandidateTrial(25, 0.80, 1.0, 100),
              CandidateTrial(50, 0.995, 2.0, 200), CandidateTrial(100, 1.0, 4.0, 400)]
    assert choose_candidates(trials, None, 0.01).candidates == 50  # fewest within 0.01 of the best
    assert choose_candidates(trials, None, 0.0).candidates == 100  # "every image" counts as the largest
    assert choose_candidates(trials, 3.0, 0.01).candidates == 50  # best agreement within the budget
    assert choose_candidates(trials, 10.0, 0.01).candidates == 100  # ties at 1.0: the fewer candidates
    assert choose_candidates(trials, 0.5, 0.01).candidates == 25  # nothing fits: the fastest
    assert choose_candidates(trials, None, 0.01, agreement=0.99).candidates == 50  # fastest reaching the target
    assert choose_candidates(trials, None, 0.01, agreement=1.0).candidates == 100
    assert choose_candidates(trials[:3], None, 0.01, agreement=0.999).candidates == 0  # none does: the best


def test_fewest_counts_the_images_a_stage_passes_on():
    union = CandidateTrial(50, 0.995, 2.0, 200, "union", 140.0)  # three query vectors' top 50, united
    fused = CandidateTrial(100, 0.995, 3.0, 100, "fused", 100.0)
    assert choose_candidates([union, fused], None, 0.0) is fused
    assert choose_candidates([union, fused], None, 0.0, agreement=0.99) is union  # a target: the fastest reaching it
    assert choose_candidates([union, fused], 10.0, 0.0) is fused  # equal agreement within the budget


def test_agreement_is_measured_against_exhaustive_over_every_image(index):
    rng = np.random.default_rng(4)
    embedded = [_unit(rng.standard_normal((3, index.encoder.dim))) for _ in range(6)]
    flat = mv.MultiVectorConfig(T=0.0, tau=2.0)  # hierarchical without pruning or early exit == exhaustive
    chosen, trials = tune_candidates(index, embedded, flat, slack=0.0)
    # the grid below the index's 120 images, for each policy, after "every image"
    assert [(t.stage, t.candidates) for t in trials] == [("union", 0)] + [
        (p, n) for p in ("union", "fused") for n in (25, 50, 100)]
    assert trials[0].agreement10 == 1.0 and trials[0].images == N
    for t in trials[1:]:  # by hand: the share of the exhaustive top 10 inside each query's candidates
        share, images = [], []
        for q in embedded:
            ref = set(mv.search("exhaustive", index.segment_table, index.global_rows.vectors, q, 10, flat)[1])
            pool = mvr.candidate_positions(index.snapshot, q, t.candidates, None, t.stage, flat.weight_global)
            share.append(len(ref & set(pool)) / 10)
            images.append(len(pool))
        assert t.agreement10 == pytest.approx(np.mean(share)) and t.images == pytest.approx(np.mean(images))
    assert trials[1].sim_ops < trials[3].sim_ops < trials[0].sim_ops + 1
    fused = {t.candidates: t for t in trials if t.stage == "fused"}
    assert fused[25].images == 25 < trials[1].images  # one list of 25 against the union of three
    assert chosen.agreement10 == max(t.agreement10 for t in trials)


def _queries(path) -> list[tuple[str, set[str]]]:
    path.write_text("\n".join(json.dumps({"text": t, "relevant": [f"{i}.jpg"]}) for i, t in enumerate(
        ["a dog runs on the grass", "two children play in a fountain", "a man on a bike", "a red car in the snow"])))
    return tune_mod.load_queries(path)


def test_tune_saves_the_chosen_size_and_search_uses_it(index, tmp_path, monkeypatch):
    monkeypatch.setattr(tune_mod, "CANDIDATE_SLACK", 1.0)  # any agreement will do: the fewest images, fused 25
    result = tune(index, _queries(tmp_path / "q.jsonl"))
    stage = result["candidates"]
    assert (stage["stage"], stage["chosen"]) == ("fused", 25) and len(stage["trials"]) == 7
    reopened = Index.open(index.path)
    saved = reopened.search_config_dict()
    assert (saved["stage"], saved["candidates"]) == ("fused", 25) and saved["tuned"]["candidates"]["chosen"] == 25
    text = "a dog runs on the grass"
    _, queries = mvr.query_vectors(reopened.snapshot, Query(text=text), mvr.MultiVectorParams())
    hits = reopened.search(text=text, k=10, mode="exhaustive")  # the saved stage is the default
    pool = mvr.candidate_positions(reopened.snapshot, queries, 25, None, "fused")
    assert "candidates_ms" in hits.timings and hits.stats.candidates_per_level[0] == len(pool) < N
    exact = reopened.search(text=text, k=10, mode="exhaustive", candidates=0)  # a per-call option wins
    assert "candidates_ms" not in exact.timings and exact.stats.candidates_per_level[0] == N
    # a re-tune that keeps every image removes the saved size (the built-in default applies again)
    monkeypatch.setattr(tune_mod, "CANDIDATE_GRID", ())
    again = tune(reopened, _queries(tmp_path / "q.jsonl"))
    assert again["candidates"]["chosen"] == 0
    assert not {"candidates", "stage"} & set(Index.open(index.path).search_config_dict())
    reopened.close()


def test_cli_candidates_only_keeps_the_scheduler_settings(index, tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    before = mv.MultiVectorConfig(T=0.7, alpha=0.5, tau=0.8)
    index.save_search_config({"multivector": before.to_dict()})
    _queries(tmp_path / "q.jsonl")
    res = CliRunner().invoke(app, ["tune", "--index", str(index.path), "--queries", str(tmp_path / "q.jsonl"),
                                   "--candidates-only", "--latency-budget-ms", "100000", "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.strip().splitlines()[-1])
    stage = result["candidates"]
    # a budget everything fits: the best agreement, the fewest candidates among equals
    best = max(t["agreement10"] for t in stage["trials"])
    assert stage["agreement10"] == best and stage["chosen"] == min(
        (t["candidates"] or 10**9) for t in stage["trials"] if t["agreement10"] == best) % 10**9
    saved = Index.open(index.path).search_config_dict()
    assert mv.MultiVectorConfig.from_dict(saved["multivector"]) == before  # no grid search ran
    assert saved.get("candidates") == (stage["chosen"] or None)
    assert saved["tuned"]["candidates"]["chosen_on"]["queries"] == 4
    bad = CliRunner().invoke(app, ["tune", "--index", str(index.path), "--queries", str(tmp_path / "none.jsonl"),
                                   "--candidates-only"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_candidates_only_needs_no_answers_in_the_index(index, tmp_path):
    """Agreement with exhaustive search uses no answers: a synthetic index at scale holds none of the queries'
    photos, and the stage is still chosen there (the full tune, which scores NDCG, still requires answers)."""
    from finegrain.tune import tune_stage

    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "relevant": ["not-indexed.jpg"]})
                              for t in ["a dog runs on the grass", "a man on a bike", "a red car"]))
    queries = tune_mod.load_queries(path)
    result = tune_stage(index, queries, save=False)
    assert result["queries"] == 3 and result["candidates"]["trials"]
    with pytest.raises(ValueError, match="relevant images"):
        tune(index, queries, save=False)


def test_cli_agreement_target(index, tmp_path):
    from typer.testing import CliRunner

    from finegrain.cli import app

    _queries(tmp_path / "q.jsonl")
    args = ["tune", "--index", str(index.path), "--queries", str(tmp_path / "q.jsonl")]
    res = CliRunner().invoke(app, [*args, "--candidates-only", "--agreement", "1.0", "--json"])
    assert res.exit_code == 0, res.output
    stage = json.loads(res.output.strip().splitlines()[-1])["candidates"]
    best = max(t["agreement10"] for t in stage["trials"])
    reaching = [t for t in stage["trials"] if t["agreement10"] >= min(1.0, best)]
    assert stage["agreement_target"] == 1.0 and stage["agreement10"] == best
    assert stage["ms_per_query"] == min(t["ms_per_query"] for t in reaching)
    # with a target the scheduler's pruning is chosen too: the saved settings and two that prune less
    prunings = {tuple(sorted(t["pruning"].items())) for t in stage["trials"]}
    assert len(prunings) == 3 and {t["pruning"]["tau"] for t in stage["trials"]} == {0.9, 1.01}
    saved = Index.open(index.path).search_config_dict()
    assert {k: saved["multivector"][k] for k in ("T", "alpha", "tau")} == stage["pruning"]
    assert (saved.get("stage"), saved.get("candidates")) == ((stage["stage"], stage["chosen"]) if stage["chosen"]
                                                             else (None, None))
    for bad in (["--agreement", "0.99"], ["--candidates-only", "--agreement", "1.5"]):
        out = CliRunner().invoke(app, [*args, *bad])
        assert out.exit_code == 2 and "--agreement" in out.output and "Traceback" not in out.output
