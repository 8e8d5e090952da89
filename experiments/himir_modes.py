"""Compare HiMIR scoring modes on pre-encoded Flickr8k dev captions over a segmented index.

Usage: python -m experiments.himir_modes INDEX N_CAPTIONS MODE[:k=v,...] ...
Example: python -m experiments.himir_modes ~/.cache/finegrain/bench/flickr8k-dev-effnet-minilm-seg-pool-4_9_16_25_36-320 1000 global exhaustive "hierarchical:T=0.7"
"""
import sys, time, numpy as np
from pathlib import Path
from finegrain import Index
from finegrain.datasets import load_flickr8k
from finegrain.decompose.query import decompose_query, RulesDecomposer
from finegrain.search import multivector as mv
from finegrain.eval.metrics import ndcg_at_k, recall_at_k
idx = Index.open(sys.argv[1])
ds = load_flickr8k('../shared/data/flickr8k', 'dev')
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
id_of = {Path(r.path).name: r.id for r in idx.records.values()}
caps = ds.captions[:n]; tgt = [id_of[ds.images[i]] for i in ds.caption_image[:n]]
dec = RulesDecomposer()
t = time.time()
Qs = [idx.encoder.encode_texts(decompose_query(c, dec)) for c in caps]
print('encoded', time.time() - t, 'mean parts', np.mean([len(q) for q in Qs]), flush=True)
table, glob, owners = idx.segment_table, idx.global_rows.vectors, idx.global_rows.owners
def ev(mode, **kw):
    cfg = mv.MultiVectorConfig(**kw); ranks = []; ops = []; t = time.perf_counter()
    for q, g in zip(Qs, tgt):
        _, pos, st = mv.search(mode, table, glob, q, 10, cfg)
        ids = owners[pos].tolist(); ranks.append(ids.index(g) if g in ids else np.inf); ops.append(st.sim_ops)
    ms = (time.perf_counter() - t) * 1000 / len(Qs)
    r = np.array(ranks)
    print(f"{mode:12s} {kw} R@1 {100*recall_at_k(r,1):.1f} R@10 {100*recall_at_k(r,10):.1f} ndcg {ndcg_at_k(r,10):.4f} ops {np.mean(ops):.0f} ms {ms:.2f}", flush=True)
for exp in sys.argv[3:]:
    mode, _, kw = exp.partition(':')
    ev(mode, **(eval(f"dict({kw})") if kw else {}))
