"""Calibrate `finegrain duplicates` thresholds on Flickr8k train copies; report them on dev copies.

For each split, a folder is generated from real Flickr8k photos:

* copy sets: an original and six edited copies of it (JPEG quality 30, resized to half, a centre crop
  of 85%, rotated 90 and 180 degrees, mirrored): every pair within a set is a near-duplicate;
* burst pairs: two frames of one photo, 75%-wide windows 25% apart (a camera panning between burst
  shots); these must come out "similar", never "near" (no original of these photos is included);
* distractors: other photos of the split, unmodified.

The folder is indexed with finegrain's default encoder and every pair scored with
`finegrain.duplicates.score_pairs` (FAISS range search, with and without the rotation/mirror
transforms). Thresholds are chosen on train only:

* candidate: the lowest embedding cosine of an original-vs-copy pair, rounded down to 0.05;
* near: the pixel-match threshold with the best balanced accuracy among candidate pairs
  (recall of near pairs averaged with the rejection of burst and different-photo pairs;
  ties: the middle of the best interval);
* similar: the 5th percentile of burst-pair embedding scores (95% of bursts at least "similar").
An embedding-only rule (near = embedding cosine above a threshold chosen the same way) is
reported too, to show why the pixel check is there.

Then dev reports precision/recall of "near" (overall and per edit), where burst pairs land, how
many pairs of different photos are flagged, and end-to-end group purity of `find_duplicates`.

Run from the repository root (about 15 minutes on two busy cores):

    PYTHONPATH=src python experiments/duplicates/calibrate.py --data ../shared/data/flickr8k \\
        --out experiments/duplicates/results
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from finegrain import Index
from finegrain.duplicates import DEFAULT_TRANSFORMS, Signatures, find_duplicates, image_signatures, score_pairs

EDITS = ("jpeg30", "half", "crop85", "rot90", "rot180", "mirror")
FLOOR = 0.4  # pairs below this embedding cosine are not scored (thresholds are chosen above it)


def edit(image: Image.Image, name: str) -> tuple[Image.Image, int]:
    """An edited copy and the JPEG quality it is saved at."""
    w, h = image.size
    if name == "jpeg30":
        return image, 30
    if name == "half":
        return image.resize((w // 2, h // 2), Image.BICUBIC), 90
    if name == "crop85":
        dx, dy = int(w * 0.075), int(h * 0.075)
        return image.crop((dx, dy, w - dx, h - dy)), 90
    if name == "rot90":
        return image.transpose(Image.ROTATE_90), 90
    if name == "rot180":
        return image.transpose(Image.ROTATE_180), 90
    if name == "mirror":
        return image.transpose(Image.FLIP_LEFT_RIGHT), 90
    raise ValueError(name)


def build_folder(data: Path, split: str, folder: Path, copies: int, bursts: int, distractors: int, seed: int) -> None:
    names = [n.strip() for n in (data / "splits" / f"{split}.txt").read_text().splitlines() if n.strip()]
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in rng.permutation(len(names))[:copies + bursts + distractors]]
    folder.mkdir(parents=True)
    for i, name in enumerate(chosen[:copies]):
        src = data / "images" / name
        shutil.copy(src, folder / f"c{i:03d}__orig.jpg")
        image = Image.open(src).convert("RGB")
        for e in EDITS:
            copy, quality = edit(image, e)
            copy.save(folder / f"c{i:03d}__{e}.jpg", quality=quality)
    for i, name in enumerate(chosen[copies:copies + bursts]):
        image = Image.open(data / "images" / name).convert("RGB")
        w, h = image.size
        width = int(w * 0.75)
        image.crop((0, 0, width, h)).save(folder / f"b{i:03d}__left.jpg", quality=90)
        image.crop((w - width, 0, w, h)).save(folder / f"b{i:03d}__right.jpg", quality=90)
    for i, name in enumerate(chosen[copies + bursts:]):
        shutil.copy(data / "images" / name, folder / f"d{i:03d}.jpg")


def labels_of(index, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per pair: 'near' (same copy set), 'burst' (same burst pair) or 'different'; and the edit of orig-vs-edit pairs."""
    stem = {r.id: Path(r.path).stem for r in index.records.values()}
    out, edits = [], []
    for x, y in zip(a.tolist(), b.tolist()):
        sx, sy = stem[x], stem[y]
        gx, gy = sx.split("__")[0], sy.split("__")[0]
        if gx == gy and gx.startswith("c"):
            out.append("near")
            vx, vy = sx.split("__")[1], sy.split("__")[1]
            edits.append(vy if vx == "orig" else vx if vy == "orig" else "edit-vs-edit")
        elif gx == gy and gx.startswith("b"):
            out.append("burst")
            edits.append("")
        else:
            out.append("different")
            edits.append("")
    return np.asarray(out), edits


def choose_near(pixel: np.ndarray, positive: np.ndarray) -> float:
    """Pixel-match threshold with the best balanced accuracy (recall of near pairs, rejection of the others).

    Balanced, because near pairs outnumber burst pairs twentyfold: a precision
    target would let a fifth of the bursts through. Ties: the middle of the best interval.
    """
    values = np.unique(np.round(pixel, 4))
    cuts = np.concatenate([[values[0] - 1e-3], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-3]])
    pos, neg = pixel[positive], pixel[~positive]
    acc = np.array([(np.mean(pos >= c) + np.mean(neg < c)) / 2 for c in cuts])
    best = np.flatnonzero(acc >= acc.max() - 1e-12)
    lo, hi = cuts[best[0]], cuts[best[-1]]
    # The optimal cuts form an interval between two observed scores: take the middle of that gap.
    below = values[values < lo].max(initial=lo) if best[0] > 0 else lo
    above = values[values >= hi].min(initial=hi)
    return round(float((below + above) / 2), 3)


def choose_candidate(pairs, label: np.ndarray, edits: list[str], n_copy_sets: int) -> float:
    """The lowest embedding cosine of an original-vs-copy pair, rounded down to 0.05 (FLOOR if one was not found)."""
    is_orig_vs_edit = np.isin(np.asarray(edits), EDITS)
    if int(is_orig_vs_edit.sum()) < n_copy_sets * len(EDITS):
        return FLOOR
    return max(FLOOR, round(float(np.floor(pairs.score[is_orig_vs_edit].min() * 20) / 20), 2))


def evaluate(index, pairs, predicted_near: np.ndarray, similar: float, n_copy_sets: int, n_bursts: int) -> dict:
    """Near precision/recall (overall and per edit), where burst pairs land, different photos flagged."""
    label, edits = labels_of(index, pairs.a, pairs.b)
    score = pairs.score
    tp = int(np.sum(predicted_near & (label == "near")))
    edits_arr = np.asarray(edits)
    per_edit = {e: round(int(np.sum(predicted_near & (edits_arr == e))) / n_copy_sets, 3) for e in EDITS}
    total_pos = n_copy_sets * (len(EDITS) + 1) * len(EDITS) // 2
    is_burst = label == "burst"
    burst_near = int(np.sum(is_burst & predicted_near))
    burst_similar = int(np.sum(is_burst & ~predicted_near & (score >= similar)))
    diff = label == "different"
    n_images = len(index)
    return {
        "near_precision": round(tp / max(1, int(predicted_near.sum())), 4),
        "near_recall_all_pairs": round(tp / total_pos, 4),
        "near_recall_orig_vs_edit": round(float(np.mean(list(per_edit.values()))), 4),
        "near_recall_by_edit": per_edit,
        "burst_pairs": n_bursts,
        "burst_as_near": round(burst_near / n_bursts, 4),
        "burst_as_similar": round(burst_similar / n_bursts, 4),
        "burst_missed": round(1 - (burst_near + burst_similar) / n_bursts, 4),
        "different_pairs_as_near": int(np.sum(diff & predicted_near)),
        "different_pairs_as_similar": int(np.sum(diff & ~predicted_near & (score >= similar))),
        "different_pairs_total": n_images * (n_images - 1) // 2 - total_pos - n_bursts,
    }


def predict(pairs, near: float, candidate: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (pairs.score >= candidate) & (pairs.pixel >= near)


def group_purity(index, report, n_copy_sets: int) -> dict:
    """Copy sets found as exactly one near group with nothing else in it."""
    stem = {r.id: Path(r.path).stem for r in index.records.values()}
    near_groups = [g for g in report.groups if g["kind"] == "near"]
    exact_sets = 0
    for g in near_groups:
        sets = {stem[i].split("__")[0] for i in g["ids"]}
        if len(sets) == 1 and next(iter(sets)).startswith("c") and len(g["ids"]) == len(EDITS) + 1:
            exact_sets += 1
    bursts_in_near = sum(1 for g in near_groups for i in g["ids"] if stem[i].startswith("b"))
    return {"near_groups": len(near_groups), "copy_sets_exactly_grouped": exact_sets,
            "copy_sets": n_copy_sets, "burst_frames_in_near_groups": bursts_in_near}


def run_split(args, split: str, seed: int) -> tuple[object, dict]:
    folder = args.work / split / "images"
    index_path = args.work / split / "index"
    if not folder.exists():
        build_folder(args.data, split, folder, args.copies, args.bursts, args.distractors, seed)
    if not index_path.exists():
        with Index.create(index_path) as index:
            index.add([folder], show_progress=True)
    index = Index.open(index_path)
    cache = args.work / split / "signatures.npz"
    t0 = time.perf_counter()
    cached = cache.exists()
    if cached:  # the transformed embeddings take minutes on a busy CPU: kept between runs
        z = np.load(cache, allow_pickle=False)
        sig = Signatures({t: z[f"emb_{t}"] for t in DEFAULT_TRANSFORMS}, z["positions"], z["pixels"],
                         z["unreadable"].tolist())
    else:
        sig = image_signatures(index, DEFAULT_TRANSFORMS, show_progress=True)
        np.savez(cache, positions=sig.positions, pixels=sig.pixels, unreadable=np.asarray(sig.unreadable, np.int64),
                 **{f"emb_{t}": v for t, v in sig.embeddings.items()})
    seconds = time.perf_counter() - t0
    with_t = score_pairs(index, FLOOR, DEFAULT_TRANSFORMS, signatures=sig)
    without = score_pairs(index, FLOOR, (), signatures=Signatures({}, sig.positions, sig.pixels, sig.unreadable))
    return index, {"with": with_t, "without": without, "signatures": sig, "signature_seconds": None if cached else round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/flickr8k"))
    parser.add_argument("--out", type=Path, default=Path("experiments/duplicates/results"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/finegrain-duplicates-calibration"))
    parser.add_argument("--copies", type=int, default=60)
    parser.add_argument("--bursts", type=int, default=60)
    parser.add_argument("--distractors", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    n_sets, n_bursts = args.copies, args.bursts

    # ---- choose on train
    train_index, train = run_split(args, "train", args.seed)
    tp = train["with"]
    t_label, t_edits = labels_of(train_index, tp.a, tp.b)
    candidate = choose_candidate(tp, t_label, t_edits, n_sets)
    eligible = (tp.score >= candidate) & np.isfinite(tp.pixel)
    near = choose_near(tp.pixel[eligible], t_label[eligible] == "near")
    burst_scores = tp.score[t_label == "burst"]
    similar = round(float(np.floor(np.percentile(burst_scores, 5) * 100) / 100), 2) if len(burst_scores) else 0.8
    near_embedding_only = choose_near(tp.score, t_label == "near")
    chosen = {"near": near, "candidate": candidate, "similar": similar, "near_embedding_only": near_embedding_only}
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "transforms": list(DEFAULT_TRANSFORMS), "floor": FLOOR, "chosen_on_train": chosen,
              "train": evaluate(train_index, tp, predict(tp, near, candidate), similar, n_sets, n_bursts)}

    # ---- report on dev
    dev_index, dev = run_split(args, "dev", args.seed + 1)
    dp, dn = dev["with"], dev["without"]
    result["dev"] = evaluate(dev_index, dp, predict(dp, near, candidate), similar, n_sets, n_bursts)
    result["dev_without_transforms"] = evaluate(dev_index, dn, predict(dn, near, candidate), similar, n_sets, n_bursts)
    result["dev_embedding_only"] = evaluate(dev_index, dp, dp.score >= near_embedding_only, similar, n_sets, n_bursts)
    # End to end as `finegrain duplicates` runs (near candidates below "similar" among 20 nearest neighbours).
    report = find_duplicates(dev_index, near=near, similar=similar, candidate=candidate, signatures=dev["signatures"])
    result["dev_groups"] = group_purity(dev_index, report, n_sets)
    result["dev_signature_seconds"] = dev["signature_seconds"]
    result["dev_images"] = len(dev_index)
    (args.out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")

    # Dev score distributions by pair kind: embedding cosine (x) against pixel match (y).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d_label, _ = labels_of(dev_index, dp.a, dp.b)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for kind, colour, size in (("different", "tab:gray", 4), ("burst", "tab:blue", 14), ("near", "tab:orange", 10)):
        m = d_label == kind
        ax.scatter(dp.score[m], dp.pixel[m], s=size, alpha=0.6, color=colour, label=f"{kind} ({int(m.sum())} pairs)")
    ax.axhline(near, color="tab:orange", ls="--", lw=1, label=f"near: pixel match >= {near}")
    ax.axvline(candidate, color="tab:orange", ls=":", lw=1, label=f"near: embedding >= {candidate}")
    ax.axvline(similar, color="tab:blue", ls="--", lw=1, label=f"similar: embedding >= {similar}")
    ax.set_xlabel("embedding cosine (best of identity, rot90, rot180, mirror)")
    ax.set_ylabel("pixel match (16x16 signatures, 8 transforms, crops)")
    ax.set_title(f"Flickr8k dev copies: pairs above embedding cosine {FLOOR}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out / "dev_scores.png", dpi=110)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
