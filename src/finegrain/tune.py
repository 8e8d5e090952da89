"""``finegrain tune``: latency-guided auto-configuration of the hierarchical scheduler (HiMIR Sec. V).

Grid-searches T (initial drop share), alpha (its multiplier per level), tau
(early-exit threshold) and the hierarchy sparsity on a sample of queries
with known answers, measuring NDCG@10 and per-query search latency (query
encoding excluded: it is the same for every configuration). The chosen
configuration is written into the index and used by default afterwards.

Hierarchy sparsity is tried two ways: a granularity stride S_G (visit every
S_G-th level), and an offline level profile (:func:`profile_levels`): levels
are dropped greedily, the one whose absence costs least NDCG@10 in exhaustive
scoring first, while the loss stays within half the slack; the dropped
levels become ``skip_levels``.

Choice: with a latency budget, the most accurate configuration within it;
without one, the fastest configuration whose NDCG@10 is within ``slack``
(0.005) of the best.

Then the candidate stage (issue 15): with the chosen configuration,
``hierarchical`` runs behind candidate stages of each policy of
:data:`CANDIDATE_STAGES` (``union``: each query vector's own top n;
``fused``: the top n of one weighted vector) and :data:`CANDIDATE_GRID`
sizes n (those below the tuning index's image count), and without one;
each is measured by its top-10 agreement with ``exhaustive`` over every
image, the images it passes on and its latency (stage included). Choice
(:func:`choose_candidates`): with the latency budget, the best agreement
within it; without one, the stage passing on the fewest images within
:data:`CANDIDATE_SLACK` of the best agreement, or, given an agreement
target (``--agreement``, :func:`tune_stage`), the fastest reaching it, each
stage also tried behind :data:`LESS_PRUNING` (the pruning chosen is saved).
A positive count is saved as the index's ``candidates`` setting with its
``stage``, the defaults of the multi-vector modes; "every image" saves
nothing (the built-in default stays). The count is images per query vector
(``union``) or in all (``fused``), not a share, so tune on an index about
as large as the one searched.

Global search breadth (:func:`tune_breadth`, ``finegrain tune --breadth-only``): on an index whose
global search is approximate (HNSW from 200,000 images, or ``--ann hnsw/ivf``), each breadth of
:data:`BREADTH_GRID` (HNSW efSearch) or :data:`NPROBE_GRID` (IVF lists probed) is measured by recall@10
against exact search over the same stored rows and by latency. Choice (:func:`choose_breadth`): with a
latency budget, the best recall within it; without one, the smallest breadth reaching ``recall``
(:data:`BREADTH_RECALL`). It is saved as the index's ``breadth``, the default of ``global`` searches.
No answers are needed (exact search is the reference), so the queries can come from another split
than the one reported; the breadth depends on the collection, so choose it on the index searched.

Held-out protocol (issue 17): the data that chooses must not be the data
reported. ``tune(..., target=other)`` runs the grid on ``index`` (for example a
segmented index of Flickr8k *train* images, queried with their own captions)
and saves the choice into ``other`` (the dev index that is then reported);
:func:`restrict_queries` keeps only queries whose answers are in a name list
(``splits/train.txt``, or one half of dev). What chose is saved with the
settings (``tuned.chosen_on``).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .eval.metrics import ndcg_at_k_graded
from .index import Index
from .search import multivector as mv

GRID = {"T": (0.3, 0.5, 0.7), "alpha": (0.5, 0.8, 1.0), "tau": (0.6, 0.8, 0.9, 1.01)}
STRIDES = (1, 2)  # plus the profiled skip list, as a third sparsity option
#: Candidate-stage sizes tried (images per query vector for ``union``, in all for ``fused``; only those below the
#: tuning index's size), besides none.
CANDIDATE_GRID = (25, 50, 100, 200, 400, 800, 1600, 3200)
#: Without a latency budget: the fewest candidates whose top-10 agreement is within this of the best size's.
CANDIDATE_SLACK = 0.01
#: Candidate-stage policies tried (retrieval.multivector.STAGES).
CANDIDATE_STAGES = ("union", "fused")
#: With an agreement target, the scheduler's pruning is chosen with the stage: the saved settings, then these
#: (T, alpha, tau) in turn, each pruning less (tau 1.01: no early exit), since pruning alone caps agreement.
LESS_PRUNING = ((None, None, 1.01), (0.3, 0.5, 1.01))


def pruning_variants(config: mv.MultiVectorConfig) -> list[mv.MultiVectorConfig]:
    """``config``, then :data:`LESS_PRUNING`'s variants of it (``None`` keeps its value); duplicates dropped."""
    out = [config]
    for T, alpha, tau in LESS_PRUNING:
        v = dataclasses.replace(config, T=config.T if T is None else T, alpha=config.alpha if alpha is None else alpha,
                                tau=tau)
        if v not in out:
            out.append(v)
    return out


#: HNSW efSearch values tried by :func:`tune_breadth` (below k = 10 they act as 10).
BREADTH_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: IVF nprobe values tried by :func:`tune_breadth` (capped at the number of lists).
NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Without a latency budget: the smallest breadth whose recall@10 against exact search reaches this.
BREADTH_RECALL = 0.99


@dataclass
class Trial:
    config: mv.MultiVectorConfig
    ndcg10: float
    ms_per_query: float
    sim_ops: float


@dataclass
class CandidateTrial:
    candidates: int  # images per query vector (union) or in all (fused); 0: no stage, every image scored
    agreement10: float  # top-10 agreement with exhaustive scoring of every image
    ms_per_query: float  # candidate stage included
    sim_ops: float  # segment scoring only (the stage's own FAISS search is not counted)
    stage: str = "union"  # the stage's policy (retrieval.multivector.STAGES)
    images: float | None = None  # images the stage passed on, mean per query (None: ``candidates``)
    pruning: dict | None = None  # the scheduler's T, alpha, tau behind the stage (None: not recorded)

    def size(self) -> float:
        """Images scored per query: what the choice minimises (every image counts as the most)."""
        if not self.candidates:
            return math.inf
        return float(self.candidates if self.images is None else self.images)


def load_queries(path: str | Path) -> list[tuple[str, set[str]]]:
    """Queries with relevant image file names.

    Accepts Flickr8k's ``captions.tsv`` (``image<TAB>caption_id<TAB>caption``),
    a two-column TSV (``text<TAB>image name``), or JSONL lines
    ``{"text": ..., "relevant": [names...]}``. Names match indexed files by base name.
    """
    path = Path(path)
    out: list[tuple[str, set[str]]] = []
    if path.suffix == ".jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                d = json.loads(line)
                out.append((str(d["text"]), {Path(r).name for r in d["relevant"]}))
        return out
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and rows[0][:3] == ["image", "caption_id", "caption"]:
        return [(r[2], {r[0]}) for r in rows[1:] if len(r) >= 3]
    return [(r[0], {Path(r[1]).name}) for r in rows if len(r) >= 2]


def load_names(path: str | Path) -> set[str]:
    """Image base names, one per line (a split list such as Flickr8k's ``splits/train.txt``); blank lines skipped."""
    names = {Path(line.strip()).name for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()}
    if not names:
        raise ValueError(f"{path} names no images")
    return names


def restrict_queries(queries: list[tuple[str, set[str]]], names: set[str]) -> list[tuple[str, set[str]]]:
    """The queries whose relevant images are all in ``names`` (the others' answers belong to the reported data)."""
    kept = [(text, rel) for text, rel in queries if rel and rel <= names]
    if not kept:
        raise ValueError("no query has all its relevant images in the given image list")
    return kept


def check_transferable(source: Index, target: Index) -> None:
    """Settings chosen on ``source`` apply to ``target`` only with the same encoder and segment levels."""
    for key in ("encoder", "segments"):
        a, b = source.snapshot.settings.get(key), target.snapshot.settings.get(key)
        if a != b:
            raise ValueError(f"the tuning index and the target index differ in {key} ({a!r} against {b!r}): "
                             "settings chosen on one do not apply to the other")


def _check_run(sample: object, latency_budget_ms: float | None) -> None:
    """A run that could choose nothing (no queries, a budget nothing meets) is refused before any work."""
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise ValueError(f"sample must be a positive number of queries, got {sample!r}")
    if latency_budget_ms is not None and not (math.isfinite(latency_budget_ms) and latency_budget_ms > 0):
        raise ValueError(f"the latency budget must be a positive number of milliseconds, got {latency_budget_ms!r}")


def tune(index: Index, queries: list[tuple[str, set[str]]], sample: int = 200, latency_budget_ms: float | None = None,
         slack: float = 0.005, seed: int = 0, plot: str | Path | None = None, save: bool = True,
         target: Index | None = None, query_source: str | None = None, candidates: bool = True) -> dict:
    """Run the grid search; returns the chosen configuration, all trials and the exhaustive reference.

    The grid runs on ``index`` (its images, the queries answered in it); the
    choice is saved into ``target`` (default: ``index`` itself), whose saved
    scoring settings (``w``, decomposer) the trials use. ``query_source``
    names where the queries came from, saved with the choice. ``candidates``: also choose the
    candidate-stage size (:func:`tune_candidates`).
    """
    _check_run(sample, latency_budget_ms)
    target = index if target is None else target
    relevant, embedded = _embedded_queries(index, target, queries, sample, seed)
    from .compress.coded import global_vectors  # the global term as a search scores it

    table, glob, owners = index.segment_table, global_vectors(index.snapshot), index.global_rows.owners
    base = mv.MultiVectorConfig.from_dict(target.search_config_dict().get("multivector", {}))

    def run(mode: str, config: mv.MultiVectorConfig) -> Trial:
        return _evaluate(mode, config, table, glob, owners, embedded, relevant)

    base = mv.MultiVectorConfig(**{**base.to_dict(), "stride": 1, "skip_levels": ()})
    exhaustive = run("exhaustive", base)
    skip = profile_levels(table, glob, owners, embedded, relevant, base, slack / 2)
    sparsity = [{"stride": s, "skip_levels": ()} for s in STRIDES]
    if skip:
        sparsity.append({"stride": 1, "skip_levels": skip})
    trials = [run("hierarchical", mv.MultiVectorConfig(**{**base.to_dict(), "T": T, "alpha": a, "tau": tau, **sp}))
              for (T, a, tau), sp in itertools.product(itertools.product(*GRID.values()), sparsity)]
    chosen = choose(trials, latency_budget_ms, slack)
    result: dict[str, Any] = {
        "queries": len(embedded),
        # What chose the settings, kept with them: report only on data that is not this.
        "chosen_on": {"index": str(Path(index.path).resolve()), "images": len(index), "queries": len(embedded),
                      "query_source": query_source},
        "profiled_skip_levels": list(skip),
        "chosen": chosen.config.to_dict(),
        "chosen_ndcg10": chosen.ndcg10,
        "chosen_ms_per_query": chosen.ms_per_query,
        "chosen_sim_ops": chosen.sim_ops,
        "exhaustive": {"ndcg10": exhaustive.ndcg10, "ms_per_query": exhaustive.ms_per_query,
                       "sim_ops": exhaustive.sim_ops},
        "trials": [{**t.config.to_dict(), "ndcg10": t.ndcg10, "ms_per_query": t.ms_per_query, "sim_ops": t.sim_ops}
                   for t in trials],
    }
    stage = None
    if candidates:
        stage, stage_trials = tune_candidates(index, embedded, chosen.config, latency_budget_ms)
        result["candidates"] = {"chosen": stage.candidates, "stage": stage.stage, "agreement10": stage.agreement10,
                                "ms_per_query": stage.ms_per_query, "sim_ops": stage.sim_ops, "slack": CANDIDATE_SLACK,
                                "trials": [dataclasses.asdict(t) for t in stage_trials]}
    if plot:
        plot_pareto(trials, chosen, exhaustive, Path(plot))
        result["plot"] = str(plot)
    if save:
        settings = {**target.search_config_dict(), "multivector": chosen.config.to_dict(),
                    "tuned": {k: result[k] for k in ("queries", "chosen_ndcg10", "chosen_ms_per_query",
                                                      "chosen_sim_ops", "exhaustive", "chosen_on")}}
        if stage is not None:
            settings["tuned"]["candidates"] = {k: v for k, v in result["candidates"].items() if k != "trials"}
            _save_stage(settings, stage)
        target.save_search_config(settings)
    return result


def _embedded_queries(index: Index, target: Index, queries: list[tuple[str, set[str]]], sample: int, seed: int,
                      answered: bool = True) -> tuple[list[set[int]], list[np.ndarray]]:
    """The sampled queries answered in ``index``: their relevant image ids and embedded (sub-)query vectors.

    ``answered=False``: every query, answered in ``index`` or not (for choices scored by agreement with
    exhaustive search, which need no answers: a synthetic index at scale has none of the queries' photos).
    """
    if target is not index:
        check_transferable(index, target)
    by_name: dict[str, int] = {}
    for r in index.records.values():
        by_name.setdefault(Path(r.path).name, r.id)
    usable = [(t, {by_name[n] for n in rel if n in by_name}) for t, rel in queries]
    usable = [(t, rel) for t, rel in usable if rel or not answered]
    if not usable:
        raise ValueError("none of the queries' relevant images are in the index" if answered
                         else "no queries to tune on")
    random.Random(seed).shuffle(usable)
    usable = usable[:sample]

    from .decompose.query import create_decomposer, decompose_query

    decomposer = create_decomposer(target.search_config_dict().get("decomposer", "rules"))
    embedded = [index.encoder.encode_texts(decompose_query(t, decomposer)) for t, _ in usable]
    return [rel for _, rel in usable], embedded


def _save_stage(settings: dict, stage: CandidateTrial) -> None:
    """The chosen stage as the index's defaults; "every image" saves nothing (the built-in default stays)."""
    settings.pop("candidates", None)
    settings.pop("stage", None)
    if stage.candidates:
        settings["candidates"] = stage.candidates
        settings["stage"] = stage.stage


def tune_stage(index: Index, queries: list[tuple[str, set[str]]], sample: int = 200,
               latency_budget_ms: float | None = None, seed: int = 0, save: bool = True, target: Index | None = None,
               query_source: str | None = None, agreement: float | None = None) -> dict:
    """Only the candidate stage (:func:`tune_candidates`), behind ``target``'s saved scheduler settings.

    For an index already tuned (or to re-choose the size after the collection grew): no grid search.
    ``agreement``: see :func:`choose_candidates`.
    """
    _check_run(sample, latency_budget_ms)
    target = index if target is None else target
    # scored by agreement with exhaustive search: the queries' answers are unused (they need not be indexed)
    _, embedded = _embedded_queries(index, target, queries, sample, seed, answered=False)
    config = mv.MultiVectorConfig.from_dict(target.search_config_dict().get("multivector", {}))
    configs = pruning_variants(config) if agreement is not None and latency_budget_ms is None else None
    stage, trials = tune_candidates(index, embedded, config, latency_budget_ms, agreement=agreement, configs=configs)
    result: dict[str, Any] = {
        "queries": len(embedded),
        "chosen_on": {"index": str(Path(index.path).resolve()), "images": len(index), "queries": len(embedded),
                      "query_source": query_source},
        "config": config.to_dict(),
        "candidates": {"chosen": stage.candidates, "stage": stage.stage, "pruning": stage.pruning,
                       "agreement10": stage.agreement10,
                       "ms_per_query": stage.ms_per_query, "sim_ops": stage.sim_ops, "slack": CANDIDATE_SLACK,
                       "agreement_target": agreement, "latency_budget_ms": latency_budget_ms,
                       "trials": [dataclasses.asdict(t) for t in trials]},
    }
    if save:
        settings = dict(target.search_config_dict())
        settings["tuned"] = {**settings.get("tuned", {}),
                             "candidates": {**{k: v for k, v in result["candidates"].items() if k != "trials"},
                                            "chosen_on": result["chosen_on"]}}
        _save_stage(settings, stage)
        if configs is not None and stage.pruning is not None:  # the target chose the pruning with the stage
            settings["multivector"] = {**config.to_dict(), **stage.pruning}
        target.save_search_config(settings)
    return result


def tune_candidates(index: Index, embedded: list[np.ndarray], config: mv.MultiVectorConfig,
                    latency_budget_ms: float | None = None, slack: float | None = None, mode: str = "hierarchical",
                    grid: tuple[int, ...] | None = None, stages: tuple[str, ...] = CANDIDATE_STAGES,
                    agreement: float | None = None, configs: list[mv.MultiVectorConfig] | None = None
                    ) -> tuple[CandidateTrial, list[CandidateTrial]]:
    """``mode`` behind each candidate-stage policy of ``stages`` and size of ``grid`` (and no stage): top-10
    agreement with exhaustive search.

    The reference is ``exhaustive`` over every image with ``config``'s weight; returns (chosen, trials).
    ``slack``, ``grid``: None, :data:`CANDIDATE_SLACK`, :data:`CANDIDATE_GRID`; ``agreement``: see
    :func:`choose_candidates`. ``configs``: scheduler settings to try behind every stage (default: ``config``
    alone; "no stage" runs with ``config`` only); a trial's ``pruning`` names the one it ran with.
    """
    from .compress.coded import global_vectors
    from .retrieval.multivector import candidate_positions

    snapshot, table = index.snapshot, index.segment_table
    sizes = [c for c in (CANDIDATE_GRID if grid is None else grid) if c < len(index)]
    if sizes and embedded:  # builds (or loads) the global ANN structure now, not inside the first size's timing
        candidate_positions(snapshot, embedded[0], sizes[0])
    glob = global_vectors(snapshot)  # after the stage loaded the ANN: the rows a search then scores
    reference = [set(mv.search("exhaustive", table, glob, q, 10, config)[1].tolist()) for q in embedded]
    configs = configs or [config]
    trials = []
    runs = [(config, "union", 0), *((c, p, n) for c in configs for p in stages for n in sizes)]
    for cfg, policy, n in runs:
        agree, ops, scored, t0 = [], 0, 0, time.perf_counter()
        for q, ref in zip(embedded, reference):
            stage = candidate_positions(snapshot, q, n, None, policy, cfg.weight_global) if n else None
            _, pos, stats = mv.search(mode, table, glob, q, 10, cfg, stage)
            agree.append(len(ref & set(pos.tolist())) / max(1, len(ref)))
            ops += stats.sim_ops
            scored += len(index) if stage is None else len(stage)
        ms = (time.perf_counter() - t0) * 1000 / len(embedded)
        trials.append(CandidateTrial(n, float(np.mean(agree)), ms, ops / len(embedded), policy,
                                     scored / max(1, len(embedded)),
                                     {"T": cfg.T, "alpha": cfg.alpha, "tau": cfg.tau}))
    chosen = choose_candidates(trials, latency_budget_ms, CANDIDATE_SLACK if slack is None else slack, agreement)
    return chosen, trials


@dataclass
class BreadthTrial:
    breadth: int  # HNSW efSearch or IVF nprobe
    recall10: float  # top-10 overlap with exact search over the same stored rows
    ms_per_query: float  # one query at a time, the product's global search call (query encoding excluded)


def tune_breadth(index: Index, queries: list[tuple[str, set[str]]], sample: int = 200,
                 latency_budget_ms: float | None = None, recall: float = BREADTH_RECALL, seed: int = 0,
                 save: bool = True, query_source: str | None = None, grid: tuple[int, ...] | None = None) -> dict:
    """Choose the breadth of ``index``'s global ANN search (module docstring); the queries' answers are unused."""
    from .retrieval.dense import breadth_structure, exact_ids, search_vectors

    _check_run(sample, latency_budget_ms)
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], not {recall}")
    snapshot = index.snapshot
    ann = breadth_structure(snapshot)
    if ann is None:
        raise ValueError("global search on this index is exact (flat below 200,000 images, or a quantised global "
                         "field): it has no breadth to tune")
    texts = sorted({t for t, _ in queries})
    if not texts:
        raise ValueError("no queries to tune on")
    random.Random(seed).shuffle(texts)
    texts = texts[:sample]
    q = np.asarray(index.encoder.encode_texts(texts), dtype=np.float32)
    exact = [set(ids) for ids in exact_ids(snapshot, q, 10).tolist()]
    if grid is None:
        nlist = int(getattr(ann.faiss, "nlist", 0))
        grid = BREADTH_GRID if ann.kind == "hnsw" else tuple(sorted({min(b, nlist) for b in NPROBE_GRID}))
    search_vectors(snapshot, q[:1], 10, breadth=grid[0])  # warm-up: loads the structure
    trials = []
    for breadth in grid:
        found, t0 = [], time.perf_counter()
        for i, ref in enumerate(exact):
            _, ids = search_vectors(snapshot, q[i:i + 1], 10, breadth=breadth)
            found.append(len(ref & set(ids[0].tolist())) / max(1, len(ref)))
        ms = (time.perf_counter() - t0) * 1000 / len(exact)
        trials.append(BreadthTrial(int(breadth), float(np.mean(found)), ms))
    chosen = choose_breadth(trials, latency_budget_ms, recall)
    result: dict[str, Any] = {
        "queries": len(exact), "kind": ann.kind, "recall_target": recall, "latency_budget_ms": latency_budget_ms,
        "chosen_on": {"index": str(Path(index.path).resolve()), "images": len(index), "queries": len(exact),
                      "query_source": query_source},
        "breadth": {**dataclasses.asdict(chosen), "trials": [dataclasses.asdict(t) for t in trials]},
    }
    if save:
        settings = dict(index.search_config_dict())
        settings["tuned"] = {**settings.get("tuned", {}),
                             "breadth": {**{k: v for k, v in result["breadth"].items() if k != "trials"},
                                         **{k: result[k] for k in ("kind", "recall_target", "latency_budget_ms",
                                                                   "chosen_on")}}}
        settings["breadth"] = chosen.breadth
        index.save_search_config(settings)
    return result


def choose_breadth(trials: list[BreadthTrial], latency_budget_ms: float | None,
                   recall: float = BREADTH_RECALL) -> BreadthTrial:
    """With a budget, the best recall within it (the fastest if none fits); without, the smallest breadth
    reaching ``recall`` (the best recall if none does). Ties go to the smaller breadth."""
    if latency_budget_ms is not None:
        within = [t for t in trials if t.ms_per_query <= latency_budget_ms]
        if not within:
            return min(trials, key=lambda t: t.ms_per_query)
        return max(within, key=lambda t: (t.recall10, -t.breadth))
    enough = [t for t in trials if t.recall10 >= recall]
    if enough:
        return min(enough, key=lambda t: t.breadth)
    return max(trials, key=lambda t: (t.recall10, -t.breadth))


def choose_candidates(trials: list[CandidateTrial], latency_budget_ms: float | None,
                      slack: float = CANDIDATE_SLACK, agreement: float | None = None) -> CandidateTrial:
    """The candidate stage to keep (see the module docstring). "Fewest" counts the images a stage passes on
    (every image counts as the most); ties go to the faster trial.

    ``agreement`` (without a budget): the fastest trial whose top-10 agreement reaches it (the fastest of the
    best if none does), instead of the fewest images within ``slack`` of the best.
    """
    if latency_budget_ms is not None:
        within = [t for t in trials if t.ms_per_query <= latency_budget_ms]
        if within:
            return max(within, key=lambda t: (t.agreement10, -t.size(), -t.ms_per_query))
        return min(trials, key=lambda t: t.ms_per_query)  # nothing fits: the fastest
    best = max(t.agreement10 for t in trials)
    if agreement is not None:
        return min((t for t in trials if t.agreement10 >= min(agreement, best)),
                   key=lambda t: (t.ms_per_query, t.size()))
    return min((t for t in trials if t.agreement10 >= best - slack), key=lambda t: (t.size(), t.ms_per_query))


def _evaluate(mode: str, config: mv.MultiVectorConfig, table: mv.SegmentTable, glob: np.ndarray, owners: np.ndarray,
              embedded: list[np.ndarray], relevant: list[set[int]]) -> Trial:
    """Mean NDCG@10, search ms per query and similarity operations of one configuration."""
    gains, ops, t0 = [], 0, time.perf_counter()
    for q, rel in zip(embedded, relevant):
        _, pos, stats = mv.search(mode, table, glob, q, 10, config)
        gains.append(ndcg_at_k_graded(owners[pos].tolist(), rel, 10))
        ops += stats.sim_ops
    ms = (time.perf_counter() - t0) * 1000 / len(embedded)
    return Trial(config, float(np.mean(gains)), ms, ops / len(embedded))


def profile_levels(table: mv.SegmentTable, glob: np.ndarray, owners: np.ndarray, embedded: list[np.ndarray],
                   relevant: list[set[int]], base: mv.MultiVectorConfig, max_loss: float) -> tuple[int, ...]:
    """Offline hierarchy-sparsity profile: levels that can go with at most ``max_loss`` NDCG@10.

    Backward elimination over exhaustive scoring: each round drops the level
    whose absence hurts NDCG@10 least, as long as the total loss against
    all levels stays within ``max_loss``; at least one level is kept.
    """
    def ndcg_without(skip: tuple[int, ...]) -> float:
        # hierarchical with no pruning and no early exit == exhaustive over the kept levels
        config = mv.MultiVectorConfig(**{**base.to_dict(), "T": 0.0, "tau": 2.0, "stride": 1, "skip_levels": skip})
        return _evaluate("hierarchical", config, table, glob, owners, embedded, relevant).ndcg10

    full = ndcg_without(())
    skip: tuple[int, ...] = ()
    while table.n_levels - len(skip) > 1:
        options = [(ndcg_without(tuple(sorted(skip + (lv,)))), lv) for lv in range(table.n_levels) if lv not in skip]
        score, level = max(options)
        if full - score > max_loss:
            break
        skip = tuple(sorted(skip + (level,)))
    return skip


def choose(trials: list[Trial], latency_budget_ms: float | None, slack: float) -> Trial:
    """The configuration to keep (see the module docstring)."""
    if latency_budget_ms is not None:
        within = [t for t in trials if t.ms_per_query <= latency_budget_ms]
        if within:
            return max(within, key=lambda t: (t.ndcg10, -t.ms_per_query))
        return min(trials, key=lambda t: t.ms_per_query)  # nothing fits: the fastest
    best = max(t.ndcg10 for t in trials)
    return min((t for t in trials if t.ndcg10 >= best - slack), key=lambda t: t.ms_per_query)


def plot_pareto(trials: list[Trial], chosen: Trial, exhaustive: Trial, path: Path) -> None:
    """Accuracy against latency of every trial, the chosen one marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter([t.ms_per_query for t in trials], [t.ndcg10 for t in trials], s=14, alpha=0.6,
               label="hierarchical trials")
    ax.scatter([exhaustive.ms_per_query], [exhaustive.ndcg10], marker="s", color="grey", label="exhaustive")
    ax.scatter([chosen.ms_per_query], [chosen.ndcg10], marker="*", s=180, color="crimson", label="chosen")
    ax.set_xlabel("search latency per query (ms, query encoding excluded)")
    ax.set_ylabel("NDCG@10")
    ax.set_title("finegrain tune: accuracy vs latency")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
