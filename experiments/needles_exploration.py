"""Exploration for small-object retrieval (MaO issue) on ../shared/data/needles -- not product code yet.

Felzenszwalb regions (scikit-image, on a 224 px copy) as object proposals,
each cropped tight (10% margin) and encoded at SIZE px; descriptors are the
image tower's raw feature map GeM-pooled (p=3, 1280-d, no text-alignment
head); the query is the landmark crop, encoded the same way. Prints images/s,
mAP of objects-max (max over crops, whole image included) and of the
MaO-style averaged descriptor.

Usage: python -m experiments.needles_exploration [SIZE=128]
"""
import json, numpy as np, time, torch, sys
from pathlib import Path
from PIL import Image
from skimage.segmentation import felzenszwalb
from skimage.measure import regionprops
from finegrain import encoders
from sklearn.metrics import average_precision_score
torch.set_num_threads(2)
D=Path('../shared/data/needles'); g=json.load(open(D/'gnd.json'))
enc=encoders.create('effnet-minilm')
names=sorted(p.name for p in (D/'scenes').iterdir())
rel=[np.array([n in set(q['relevant']) for n in names]) for q in g['queries']]
def mAP(S): return np.mean([average_precision_score(r, S[:,j]) for j,r in enumerate(rel)])
SIZE=int(sys.argv[1]) if len(sys.argv)>1 else 128
def gem(Fm,p=3): return torch.nn.functional.normalize(Fm.clamp(min=1e-6).pow(p).mean((-2,-1)).pow(1/p),dim=-1)
qimgs=[Image.open(D/'queries'/q['query']).convert('RGB') for q in g['queries']]
Qr=gem(torch.from_numpy(enc.feature_maps(qimgs,size=SIZE))).numpy()
Qp=enc.encode_images(qimgs)
def proposals(img, seg_side=224, scale=300, cap=24):
    small=np.asarray(img.resize((seg_side,seg_side)))
    lab=felzenszwalb(small,scale=scale,sigma=0.8,min_size=seg_side*seg_side//400)
    sx,sy=img.width/seg_side,img.height/seg_side
    out=[]
    for rp in regionprops(lab+1):
        y0,x0,y1,x1=rp.bbox; a=(x1-x0)*(y1-y0)/seg_side**2
        if 0.004<=a<=0.5: out.append((rp.area,[x0*sx,y0*sy,x1*sx,y1*sy]))
    out.sort(key=lambda t:-t[0])
    return [b for _,b in out[:cap]]
def crop(img,b,pad=0.1):
    x0,y0,x1,y1=b; w,h=x1-x0,y1-y0; side=max(w,h)*(1+2*pad); cx,cy=(x0+x1)/2,(y0+y1)/2
    return img.crop((int(cx-side/2),int(cy-side/2),int(cx+side/2),int(cy+side/2)))
t=time.time(); Sr_max=[];Sr_mean=[];Sp_max=[];Sp_mean=[];nprop=[]; tprop=0
for i,n in enumerate(names):
    img=Image.open(D/'scenes'/n).convert('RGB')
    t0=time.time(); bx=proposals(img); tprop+=time.time()-t0
    crops=[img]+[crop(img,b) for b in bx]; nprop.append(len(crops))
    pix=np.stack([enc.preprocess(c,size=SIZE) for c in crops])
    with torch.inference_mode():
        Fm=enc.feature_map_batch(torch.from_numpy(pix))
        Vr=gem(Fm).numpy()
        Vp=enc.project(enc.pool_regions_batch(Fm).numpy()) if hasattr(enc,'pool_regions_batch') else None
    sr=Vr@Qr.T; Sr_max.append(sr.max(0)); m=Vr.mean(0); Sr_mean.append((m/np.linalg.norm(m))@Qr.T)
    if i%100==0: print(i,time.time()-t,flush=True)
el=time.time()-t
print('SIZE',SIZE,'img/s',len(names)/el,'prop s/img',tprop/len(names),'crops/img',np.mean(nprop))
print('raw objects-max mAP',round(mAP(np.array(Sr_max)),4),'raw objects(mean) mAP',round(mAP(np.array(Sr_mean)),4))
