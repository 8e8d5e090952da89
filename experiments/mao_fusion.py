"""Fusion and cap study for MaO on needles, from the crop vectors saved by experiments/mao_refine_sweep.py.

Usage: python -m experiments.mao_fusion /tmp/sweep.npz
"""
import sys
import json, numpy as np
from sklearn.metrics import average_precision_score
z=np.load(sys.argv[1]); V,O,Q=z['vectors'],z['owners'],z['Q']
g=json.load(open('/work/shared/data/needles/gnd.json')); names=[s['image'] for s in g['scenes']]
rel=[np.array([n in set(q['relevant']) for n in names]) for q in g['queries']]
def mAP(S): return np.mean([average_precision_score(r,S[:,j]) for j,r in enumerate(rel)])
starts=np.searchsorted(O,np.arange(len(names)))
idx_in=np.arange(len(O))-starts[O]
mu=V.mean(0)
for cap in (4,8,12,16,24):
    keep=idx_in<=cap
    v,o=V[keep],O[keep]
    sims=v@Q.T
    mx=np.full((len(names),len(Q)),-9.); np.maximum.at(mx,o,sims)
    mean=np.zeros((len(names),V.shape[1])); np.add.at(mean,o,v); 
    mn=mean/np.linalg.norm(mean,axis=1,keepdims=True)
    c=mean/np.bincount(o)[:,None]-mu; c/=np.linalg.norm(c,axis=1,keepdims=True); qc=Q-mu; qc/=np.linalg.norm(qc,axis=1,keepdims=True)
    print(cap,'objs/img',keep.sum()/len(names),'max',round(mAP(mx),4),'mean',round(mAP(mn@Q.T),4),'centred mean',round(mAP(c@qc.T),4))
print('--- pooling of crop vectors into one descriptor (cap 24)')
for p in (1,2,3,5,8,'max'):
    if p=='max':
        d=np.zeros((len(names),V.shape[1])); np.maximum.at(d,O,V)
    else:
        d=np.zeros((len(names),V.shape[1])); np.add.at(d,O,np.clip(V,0,None)**p); d=(d/np.bincount(O)[:,None])**(1/p)
    d/=np.linalg.norm(d,axis=1,keepdims=True)
    for qp in ((1,)):
        print('p',p,'mAP',round(mAP(d@Q.T),4))
keep=idx_in>=1
d=np.zeros((len(names),V.shape[1])); np.add.at(d,O[keep],V[keep]); d/=np.linalg.norm(d,axis=1,keepdims=True)
print('mean without whole image',round(mAP(d@Q.T),4))
