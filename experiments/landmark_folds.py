"""Markdown tables of a two-fold landmark run (``finegrain bench compress|revisitop --folds 2 --json``).

The numbers come from the product commands; this only lays their JSON out as
the per-fold tables of docs/benchmarks.md, docs/compress.md and docs/l2g.md
(reported fold, the fold that chose, the chosen setting, and the mean of the
two folds).

Usage (from the repository root):
  finegrain bench compress --data ../shared/data/rparis6k-mini --distractors all7k.txt --folds 2 \\
      --dims 32,64,128 --json > compress_folds.jsonl
  python -m experiments.landmark_folds compress_folds.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def last_json(path: Path) -> dict:
    return json.loads([line for line in path.read_text().splitlines() if line.startswith("{")][-1])


def compress_tables(report: dict) -> str:
    dims = sorted({r["dim"] for r in report["results"] if r["method"] != "none"})
    lines = [f"{report['database']} images + {report['distractors']} distractors "
             f"(of {report['distractors_requested']} listed), fit on {report['fitted_on']}, seed {report['seed']}.", ""]
    for f in report["folds"]:
        lines.append(f"- fold {f['fold']}: {', '.join(f['landmarks'])} ({f['queries']} official queries, "
                     f"{f['class_queries']} class queries)")
    lines += ["", "| reported on (chosen on) | method | setting chosen | "
              + " | ".join(f"class {d}" for d in dims) + " | " + " | ".join(f"Medium {d}" for d in dims) + " |",
              "|---|---|---|" + "---:|" * (2 * len(dims))]
    rows: dict[tuple, dict] = defaultdict(dict)
    for r in report["results"]:
        rows[(r["fold"], r["chosen_on"], r["method"], r["setting"])][r["dim"]] = r
    for (fold, chosen_on, method, setting), by_dim in rows.items():
        if method == "none":
            r = next(iter(by_dim.values()))
            lines.append(f"| {fold} ({chosen_on}) | none ({r['dim']}-d) | | {r['class_map']:.2f} (all sizes) | "
                         + " | " * (len(dims) - 1) + f" {r['map_medium']:.2f} |" + " |" * (len(dims) - 1))
            continue
        lines.append(f"| {fold} ({chosen_on}) | {method} | {setting} | "
                     + " | ".join(f"{by_dim[d]['class_map']:.2f}" if d in by_dim else "" for d in dims) + " | "
                     + " | ".join(f"{by_dim[d]['map_medium']:.2f}" if d in by_dim else "" for d in dims) + " |")
    means: dict[tuple, list] = defaultdict(list)
    for r in report["results"]:
        means[(r["method"], r["dim"])].append(r["class_map"])
    lines += ["", "Mean of the two reported folds (class mAP):", "",
              "| method | " + " | ".join(str(d) for d in dims) + " |", "|---|" + "---:|" * len(dims)]
    for method in ("pca", "aesvc", "aesvc-paper", "ss2d"):
        if any((method, d) in means for d in dims):
            lines.append(f"| {method} | " + " | ".join(
                f"{sum(means[method, d]) / len(means[method, d]):.2f}" if (method, d) in means else "" for d in dims)
                + " |")
    lines += ["", "Goals:", ""]
    for g in report["goals"]:
        detail = {k: round(v, 3) for k, v in g.items() if isinstance(v, float)}
        lines.append(f"- fold {g['fold']}: {g['goal']}: {'met' if g['met'] else 'NOT met'} {detail}")
    lines += ["", "Choices: " + "; ".join(f"on {c['chosen_on']}: aesvc {c['aesvc']}, ss2d {c['ss2d']}"
                                          for c in report["choices"])]
    return "\n".join(lines)


def l2g_tables(report: dict) -> str:
    lines = [f"{report['database']} images + {report['distractors']} distractors "
             f"(of {report['distractors_requested']} listed).", ""]
    for f in report["folds"]:
        lines.append(f"- fold {f['fold']}: {', '.join(f['landmarks'])} ({f['queries']} official queries, "
                     f"{f['class_queries']} class queries)")
    lines += ["", "| reported on | row | setting (chosen on) | mAP E / M / H (official queries) | class mAP |",
              "|---|---|---|---|---:|"]
    for r in report["results"]:
        chosen = f" (chosen on {r['chosen_on']})" if r.get("chosen_on") else ""
        lines.append(f"| {r['fold']} | {r['row']} | {r['setting']}{chosen} | {r['map_easy']:.1f} / "
                     f"{r['map_medium']:.1f} / {r['map_hard']:.1f} | {r['class_map']:.2f} |")
    means: dict[str, list] = defaultdict(list)
    for r in report["results"]:
        means[r["row"]].append((r["map_medium"], r["class_map"]))
    lines += ["", "| row | mean Medium | mean class mAP |", "|---|---:|---:|"]
    for row, vals in means.items():
        medium, klass = (sum(v[i] for v in vals) / len(vals) for i in (0, 1))
        lines.append(f"| {row} | {medium:.1f} | {klass:.2f} |")
    lines += ["", "All candidates (class mAP A / B):", ""]
    cand: dict[str, dict] = defaultdict(dict)
    for c in report["candidates"]:
        cand[c["setting"]][c["fold"]] = c
    for name, by_fold in cand.items():
        lines.append(f"- {name}: " + " / ".join(f"{by_fold[f]['class_map']:.2f}" for f in sorted(by_fold))
                     + "; Medium " + " / ".join(f"{by_fold[f].get('map_medium', float('nan')):.1f}"
                                                for f in sorted(by_fold)))
    lines += ["", "Goals:", ""]
    for g in report["goals"]:
        detail = {k: round(v, 2) for k, v in g.items() if isinstance(v, float)}
        lines.append(f"- fold {g['fold']}: {g['goal']}: {'met' if g['met'] else 'NOT met'} {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="files whose last JSON line is a --folds report")
    args = ap.parse_args(argv)
    for path in args.runs:
        report = last_json(path)
        print(f"## {path}\n")
        print(compress_tables(report) if report["benchmark"] == "compress" else l2g_tables(report))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
