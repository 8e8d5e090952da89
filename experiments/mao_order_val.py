"""MaO region order (most compact first vs largest first), compared on Stage-A validation composites.

Issue 17: the proposal order was chosen on needles. This re-encodes the same validation composites (same seed
and Flickr8k *train* images as the cache of `finegrain train-objects --cache-dir DIR`) with the regions sorted
largest first, into ``DIR-largest``, and compares validation MRR at the default settings, paired per query.
Rule (as for the other MaO defaults): change only if the other order is better by more than 2 paired SE.

Usage: PYTHONPATH=src python -m experiments.mao_order_val DIR FLICKR8K
"""
from __future__ import annotations

import functools
import json
import sys

import numpy as np

import finegrain.objects.proposals as proposals
from finegrain.objects.config import ObjectConfig
from finegrain.train.stagea import CacheConfig, build_cache, load_split, padded, reciprocal_ranks


def main(cache_dir: str, data: str) -> None:
    cfg = ObjectConfig()
    key = json.loads(open(f"{cache_dir}/val.json").read())
    if key["objects"]["crop_size"] != cfg.crop_size:
        raise SystemExit(f"{cache_dir} holds {key['objects']['crop_size']}-px crops; the default is {cfg.crop_size}")
    compact = load_split(cache_dir, "val")
    proposals.region_proposals = functools.partial(proposals.region_proposals, order="largest")
    largest = build_cache(data, f"{cache_dir}-largest", CacheConfig(**{**key["cache"], "n_train": 1}), cfg,
                          show_progress=False)["val"]
    rr = {name: reciprocal_ranks(None, *padded(split, cfg.max_objects + 1), cfg.pool_p)
          for name, split in (("compact", compact), ("largest", largest))}
    for mode in ("objects_max", "objects"):
        d = rr["largest"][mode] - rr["compact"][mode]
        print(f"{mode:11s} compact-first MRR {rr['compact'][mode].mean():.4f}  largest-first "
              f"{rr['largest'][mode].mean():.4f}  (gain {d.mean():+.4f}, SE {d.std(ddof=1) / np.sqrt(len(d)):.4f})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
