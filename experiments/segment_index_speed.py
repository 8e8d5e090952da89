"""Indexing throughput of global-only, pool and crop segment indexes on Flickr8k dev images.

Usage: python -m experiments.segment_index_speed {global,pool,crop} N_IMAGES [prof]
"""
import sys, time, shutil, cProfile, pstats
from finegrain import Index
from finegrain.datasets import load_flickr8k
from finegrain.decompose.segments import SegmentConfig
paths = load_flickr8k('../shared/data/flickr8k','dev').image_paths()
mode, n = sys.argv[1], int(sys.argv[2])
shutil.rmtree('/tmp/segspeed', ignore_errors=True)
seg = None if mode == 'global' else SegmentConfig(embed=mode)
idx = Index.create('/tmp/segspeed', segments=seg)
idx.add(paths[900:904])  # warm-up
pr = cProfile.Profile()
if len(sys.argv) > 3: pr.enable()
t = time.perf_counter(); r = idx.add(paths[:n]); dt = time.perf_counter() - t
pr.disable()
print(mode, n, 'images/s', round(r.indexed / dt, 2), 'segments', len(idx.fields.get('segments', [])))
if len(sys.argv) > 3: pstats.Stats(pr).sort_stats('tottime').print_stats(12)
