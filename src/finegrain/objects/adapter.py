"""Stage A object adapters in an index: read, check, apply (numpy only), copy into the index folder.

An adapter (trained by ``finegrain train-objects``, see :mod:`finegrain.train.objects`)
maps a raw crop vector ``v`` to ``normalize(relu(exp(s) * v + U V^T v))``. An
index built with one stores the adapted crop vectors (``objects``) and the
fused descriptor of the adapted crops (``objects_mean``), and adapts every
object-mode query the same way. The index keeps its own copy of the file
(:data:`ADAPTER_FILE`) and its SHA-256 in the objects settings
(``ObjectConfig.adapter``), so the index is self-contained and a changed or
damaged copy is refused instead of silently mixing spaces.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

#: The adapter's copy inside an index folder (its JSON sidecar next to it).
ADAPTER_FILE = "object-adapter.safetensors"
TENSORS = ("log_scale", "down", "up")


class AdapterError(ValueError):
    """An adapter file is missing, damaged, or not an adapter (the message is one line for the user)."""


def file_digest(path: str | Path) -> str:
    """SHA-256 (hex) of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_adapter(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(weights, meta) of an adapter file; :class:`AdapterError` with a one-line reason if it is not a valid one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"object adapter {path} does not exist (train one with `finegrain train-objects`)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            weights = {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
            meta = json.loads((f.metadata() or {}).get("stagea", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:  # truncated, not safetensors, bad JSON metadata
        raise AdapterError(f"object adapter {path} is damaged or not a safetensors file ({exc})") from None
    missing = sorted(set(TENSORS) - set(weights))
    if missing:
        raise AdapterError(f"{path} is not a Stage A adapter: missing {missing}")
    s, down, up = weights["log_scale"], weights["down"], weights["up"]
    if s.ndim != 1 or down.ndim != 2 or up.ndim != 2 or down.shape != (len(s), up.shape[0]) or up.shape[1] != len(s):
        raise AdapterError(f"{path} is not a Stage A adapter: inconsistent shapes "
                           f"{s.shape}, {down.shape}, {up.shape}")
    if not all(np.isfinite(w).all() for w in weights.values()):
        raise AdapterError(f"object adapter {path} is damaged: its weights are not finite")
    return weights, meta if isinstance(meta, dict) else {}


def apply_adapter(weights: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    """The adapter on (N, D) or (D,) vectors: float32, L2-normalised (same result as the torch module)."""
    v = np.asarray(vectors, np.float32)
    if v.shape[-1] != len(weights["log_scale"]):
        raise AdapterError(f"the object adapter takes {len(weights['log_scale'])}-d crop vectors, "
                           f"not {v.shape[-1]}-d (trained for another encoder?)")
    out = v * np.exp(weights["log_scale"]) + (v @ weights["down"]) @ weights["up"]
    out = np.maximum(out, 0.0)
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    return (out / np.maximum(norm, 1e-8)).astype(np.float32)


def install(index_root: str | Path, source: str | Path) -> str:
    """Copy an adapter (and its JSON sidecar, if any) into an index folder; returns its SHA-256."""
    read_adapter(source)  # refuse a bad file before anything is written
    source, root = Path(source), Path(index_root)
    digest = file_digest(source)
    tmp = root / (ADAPTER_FILE + ".tmp")
    shutil.copyfile(source, tmp)
    if file_digest(tmp) != digest:
        tmp.unlink()
        raise AdapterError(f"object adapter {source} changed while being copied; try again")
    tmp.replace(root / ADAPTER_FILE)  # atomic: never a half-written adapter under the real name
    sidecar = source.with_suffix(".json")
    if sidecar.is_file():
        shutil.copyfile(sidecar, root / Path(ADAPTER_FILE).with_suffix(".json"))
    return digest


def index_adapter(index_root: str | Path, digest: str) -> dict[str, np.ndarray]:
    """The weights of the adapter an index records (its copy checked against the recorded SHA-256)."""
    path = Path(index_root) / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"the index at {index_root} was built with an object adapter but its copy "
                           f"{ADAPTER_FILE} is missing; copy the adapter file there (sha256 {digest[:12]}...)")
    return _cached(str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size, digest)


@lru_cache(maxsize=8)
def _cached(path: str, mtime_ns: int, size: int, digest: str) -> dict[str, np.ndarray]:
    actual = file_digest(path)
    if actual != digest:
        raise AdapterError(f"the object adapter {path} does not match the index (sha256 {actual[:12]}... "
                           f"instead of {digest[:12]}...): it was changed or damaged; restore it or re-index")
    return read_adapter(path)[0]
