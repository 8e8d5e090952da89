"""A clip-retrieval-compatible back end: ``POST /knn-service``, ``POST /metadata``, ``GET /indices-list``.

Request and response shapes follow clip-retrieval's ``clip_back`` (2.45), so
its ``ClipClient`` and front end talk to ``finegrain serve`` unchanged
(docs/interop.md)::

    POST /knn-service {"text" | "image" (base64) | "embedding_input", "modality": "image",
                       "num_images", "num_result_ids", "indice_name", "deduplicate", ...}
      -> [{"id", "similarity", "url", "caption"}, ...]   best first
    POST /metadata {"ids": [...], "indice_name"} -> [{"id", "metadata": {"url", "caption"}}, ...]
    GET /indices-list -> ["<index folder name>"]

Differences, all answered with a clear 4xx rather than silently:
``image_url`` is refused (finegrain makes no network requests: send the
image itself), ``modality: "text"`` is refused (an index holds image
embeddings, not caption embeddings), ``use_mclip: true`` is refused.
``use_safety_model``, ``use_violence_detector``, ``aesthetic_score`` and
``aesthetic_weight`` are accepted and ignored, as clip_back does when it runs
without those models (``ClipClient`` always sends them); the response names
them in an ``X-Finegrain-Ignored`` header. ``id`` is the finegrain image id;
``url`` is the image's own URL when it was imported from one, else the
service's thumbnail URL; ``caption`` is the file name (server folders are
never published). ``deduplicate`` drops results whose embeddings are within
cosine 0.94 of a better-ranked one (clip_back's rule).

Over a shard set (``finegrain serve --index SET``) /knn-service runs the
set's merged global search (:meth:`~finegrain.shards.ShardedIndex.search_embedding`,
what /api/search runs in global mode); ids are per shard, so each result
also names its ``shard`` and its ``url`` is ``/api/thumbnail/ID?shard=N``.
/metadata, which takes bare ids, answers 400 ``metadata_unavailable`` on a set.

The routes obey the service's API key: with one set they need it, as
``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or HTTP Basic with the key
as password (what ``requests`` sends from a ``~/.netrc`` entry, so
``ClipClient`` works unchanged).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import os
import weakref
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from ..images import ImageLoadError, load_image_sized
from .setholder import ServedSet

#: Paths whose JSON bodies may carry a base64 image (the service allows them the upload size limit).
LARGE_BODY_PATHS = frozenset({"/knn-service"})
DEDUP_THRESHOLD = 0.94  # clip_back's cosine threshold for "the same image"
MAX_METADATA_IDS = 1000
MAX_EMBEDDING_DIM = 8192
SET_METADATA = ("/metadata is not available on a shard set: image ids are per shard, so an id alone is ambiguous; "
                "/knn-service already returns each result's url, caption and shard (ask for num_result_ids equal "
                "to num_images), and GET /api/images/ID?shard=N gives an image's details")
IGNORED_OPTIONS = ("use_safety_model", "use_violence_detector", "aesthetic_score", "aesthetic_weight")


class ClipBackError(HTTPException):
    """A 4xx answered as ``{"error": code, "message": ...}`` by the service's error handler."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


class KnnRequest(BaseModel):
    """``POST /knn-service`` body: clip_back's fields (unknown ones are ignored, as clip_back does)."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, description="Text query (needs the index's own encoder).")
    image: str | None = Field(None, description="Example image, base64 (standard alphabet).")
    image_url: str | None = Field(None, description="Refused: finegrain fetches nothing from the network.")
    embedding_input: list[float] | None = Field(None, description="A query vector in the index's embedding space.")
    modality: Literal["image", "text"] = Field("image", description="'image' (the only one an index holds).")
    num_images: int = Field(40, description="Results returned with metadata.")
    num_result_ids: int | None = Field(None, description="Neighbours searched (default num_images).")
    indice_name: str | None = Field(None, description="Index name from GET /indices-list (default: the first).")
    use_mclip: bool = False
    deduplicate: bool = False
    use_safety_model: bool = False
    use_violence_detector: bool = False
    aesthetic_score: int | str | None = None
    aesthetic_weight: float | str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[int]
    indice_name: str | None = None


def clip_back_router(api_key: str | None = None) -> APIRouter:
    """The three clip_back routes, reading the service's index holder and limits from ``request.app.state``."""
    deps = [Depends(_auth(api_key))] if api_key else []
    router = APIRouter(dependencies=deps, tags=["clip-retrieval"])

    @router.get("/indices-list")
    def indices_list(request: Request) -> list[str]:
        """The index names this back end serves (one: the index folder's name)."""
        return [_name(request)]

    @router.post("/knn-service", response_model=None)
    async def knn_service(request: Request) -> JSONResponse:
        """Nearest images of a text, a base64 image or an embedding, in clip_back's response shape."""
        body = await _parse(request, KnnRequest)
        ignored = [name for name in IGNORED_OPTIONS if _given(getattr(body, name))]
        results, missing = await run_in_threadpool(_knn, request, body)
        headers = {"X-Finegrain-Ignored": ",".join(ignored)} if ignored else {}
        if missing:  # a shard set on Ray with shards down: never a silent short answer
            headers["X-Finegrain-Partial"] = ",".join(missing)
        return JSONResponse(results, headers=headers or None)

    @router.post("/metadata", response_model=None)
    async def metadata(request: Request) -> JSONResponse:
        """``url`` and ``caption`` of image ids returned by /knn-service."""
        body = await _parse(request, MetadataRequest)
        _check_name(request, body.indice_name)
        if len(body.ids) > MAX_METADATA_IDS:
            raise ClipBackError(400, "too_many_ids", f"at most {MAX_METADATA_IDS} ids per request")
        return JSONResponse(await run_in_threadpool(_metadata_of, request, body.ids))

    return router


# ------------------------------------------------------------------ helpers
def _metadata_of(request: Request, ids: list[int]) -> list[dict]:
    with request.app.state.holder.use() as index:  # may re-open the index: not on the event loop
        if _is_set(index):
            raise ClipBackError(400, "metadata_unavailable", SET_METADATA)
        unknown = [i for i in ids if i not in index.records]
        if unknown:
            raise ClipBackError(404, "not_found", f"no indexed image with id(s) {unknown[:10]}")
        return [{"id": i, "metadata": _metadata(request, i, index.records[i].path)} for i in ids]


def _name(request: Request) -> str:
    return request.app.state.holder.path.name or "index"


def _check_name(request: Request, name: str | None) -> None:
    if name is not None and name != _name(request):
        raise ClipBackError(400, "unknown_index", f"unknown indice_name {name!r}; this back end serves "
                                                  f"{[_name(request)]} (GET /indices-list)")


def _given(value: Any) -> bool:
    return value not in (None, False, "")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    """The JSON body whatever its content type (clip_back reads it with ``force=True``; ClipClient sends none)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ClipBackError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ClipBackError(400, "bad_json", "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise ClipBackError(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}") from None


def _check_options(body: KnnRequest, limits) -> tuple[int, int]:
    given = [name for name in ("text", "image", "image_url", "embedding_input") if _given(getattr(body, name))]
    if len(given) != 1:
        raise ClipBackError(400, "bad_query", "give exactly one of text, image (base64), embedding_input"
                            + (f" (got {', '.join(given)})" if given else ""))
    if body.image_url:
        raise ClipBackError(400, "image_url_refused", "finegrain makes no network requests, so it does not fetch "
                                                      "image_url; send the image itself, base64, in 'image'")
    if body.modality != "image":
        raise ClipBackError(400, "modality_unavailable", "modality 'text' searches caption embeddings, which a "
                                                         "finegrain index does not hold; use modality 'image'")
    if body.use_mclip:
        raise ClipBackError(400, "mclip_unavailable", "use_mclip is not available: finegrain embeds text with the "
                                                      "index's own encoder; send use_mclip false")
    score, weight = body.aesthetic_score, body.aesthetic_weight
    if _given(score) and not (str(score).isdigit() and 0 <= int(str(score)) <= 9):
        raise ClipBackError(400, "bad_option", "aesthetic_score must be an integer from 0 to 9 (it is ignored)")
    if _given(weight):
        try:
            ok = math.isfinite(float(weight))  # type: ignore[arg-type]
        except ValueError:
            ok = False
        if not ok:
            raise ClipBackError(400, "bad_option", "aesthetic_weight must be a number (it is ignored)")
    num_images = body.num_images
    num_ids = body.num_result_ids if body.num_result_ids is not None else num_images
    for name, value in (("num_images", num_images), ("num_result_ids", num_ids)):
        if not 1 <= value <= limits.max_k:
            raise ClipBackError(400, "bad_k", f"{name} must be between 1 and {limits.max_k}, not {value}")
    return num_images, num_ids


def _query_vector(index, body: KnnRequest, limits) -> np.ndarray:
    try:
        if body.text:
            if len(body.text) > limits.max_query_chars:
                raise ClipBackError(413, "query_too_long", f"the text query has {len(body.text)} characters; the "
                                                           f"limit is {limits.max_query_chars}")
            return index.embed_query(text=body.text)
        if body.image:
            return index.embed_query(image=_decode_image(body.image, limits, index.encoder.image_size))
    except ClipBackError:
        raise
    except ValueError as exc:  # an external encoder, a bad text, a bad image (ImageLoadError)
        raise ClipBackError(400, "bad_query", str(exc)) from None
    vector = np.asarray(body.embedding_input, dtype=np.float64)
    if vector.ndim != 1 or not 1 <= len(vector) <= MAX_EMBEDDING_DIM or not np.isfinite(vector).all():
        raise ClipBackError(400, "bad_embedding", "embedding_input must be a list of finite numbers")
    dim = int(index.catalog.get_meta("dim"))
    if len(vector) != dim:
        raise ClipBackError(400, "bad_embedding", f"embedding_input has {len(vector)} numbers; this index's "
                                                  f"embeddings have {dim}")
    return vector.astype(np.float32)


def _decode_image(data: str, limits, draft_size: int) -> Any:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClipBackError(400, "bad_image", "image is not valid base64") from None
    if len(raw) > limits.max_upload_bytes:
        raise ClipBackError(413, "upload_too_large", f"the image is larger than {limits.max_upload_bytes} bytes")
    if not raw:
        raise ClipBackError(400, "bad_image", "the image is empty")
    try:
        return load_image_sized(raw, max_pixels=limits.max_image_pixels, draft_size=draft_size)[0]
    except ImageLoadError as exc:
        status, code = (413, "image_too_large") if "pixels" in str(exc) else (400, "bad_image")
        raise ClipBackError(status, code, f"the image cannot be used: {exc}") from None


def _is_set(index: Any) -> bool:
    """Whether the service serves a shard set (image ids are then per shard)."""
    return isinstance(index, ServedSet)


def _knn(request: Request, body: KnnRequest) -> tuple[list[dict], list[str]]:
    """The results, and the shards (of a set) that could not answer."""
    state = request.app.state
    _check_name(request, body.indice_name)
    num_images, num_ids = _check_options(body, state.limits)
    with state.holder.use() as index:
        if _is_set(index):
            return _knn_set(request, index, body, num_images, num_ids)
        query = _query_vector(index, body, state.limits)
        try:
            scores, ids = index.search_vectors(query[None, :], num_ids)
        except ValueError as exc:
            raise ClipBackError(400, "bad_query", str(exc)) from None
        keep = ids[0] >= 0
        ids, scores = ids[0][keep], scores[0][keep]
        if body.deduplicate and len(ids) > 1:
            chosen = _dedup(_vectors(index, ids))
            ids, scores = ids[chosen], scores[chosen]
        results = []
        for rank, (i, s) in enumerate(zip(ids.tolist(), scores.tolist())):
            hit = {"id": int(i), "similarity": float(s)}
            if rank < num_images:  # clip_back: metadata for the first num_images only
                hit.update(_metadata(request, int(i), index.records[int(i)].path))
            results.append(hit)
        return results, []


def _knn_set(request: Request, served: Any, body: KnnRequest, num_images: int,
             num_ids: int) -> tuple[list[dict], list[str]]:
    """/knn-service over a shard set: the set's own merged global search (:meth:`ShardedIndex.search_embedding`).

    Ids are per shard, so every result also names its ``shard``, and its ``url`` is ``/api/thumbnail/ID?shard=N``.
    """
    shards = served.backend.shards
    if body.deduplicate and not all(hasattr(s, "search_rows") for s in shards):
        raise ClipBackError(400, "deduplicate_unavailable", "deduplicate is not available on a shard set served "
                                                            "with --ray (the vectors are on the shards' nodes); "
                                                            "send deduplicate false")
    query = _query_vector(served, body, request.app.state.limits)
    try:
        response = served.search_embedding(query, k=num_ids)
    except ValueError as exc:
        raise ClipBackError(400, "bad_query", str(exc)) from None
    hits = list(response.hits)
    if body.deduplicate and len(hits) > 1:
        vectors = np.empty((len(hits), 0), np.float32)
        for n in sorted({h.shard for h in hits}):
            rows = [i for i, h in enumerate(hits) if h.shard == n]
            part = _vectors(served.shard(n), np.asarray([hits[i].id for i in rows], np.int64))
            if vectors.shape[1] == 0:
                vectors = np.zeros((len(hits), part.shape[1]), np.float32)
            vectors[rows] = part
        hits = [hits[i] for i in _dedup(vectors).tolist()]
    results = []
    for rank, h in enumerate(hits):
        hit: dict[str, Any] = {"id": int(h.id), "similarity": float(h.score), "shard": h.shard}
        if rank < num_images:  # clip_back: metadata for the first num_images only
            hit.update(_metadata(request, int(h.id), h.path, h.shard))
        results.append(hit)
    return results, list(response.partial)


_ROWS: weakref.WeakKeyDictionary[Any, tuple[np.ndarray, np.ndarray]] = weakref.WeakKeyDictionary()


def _vectors(index, ids: np.ndarray) -> np.ndarray:
    """The searched (L2-normalised) vectors of image ``ids`` (row lookup cached per loaded index)."""
    if index not in _ROWS:
        order = np.argsort(index.search_rows.owners, kind="stable")
        _ROWS[index] = (order, index.search_rows.owners[order])
    order, sorted_owners = _ROWS[index]
    rows = order[np.searchsorted(sorted_owners, ids)]
    vectors = np.asarray(index.search_rows.vectors[rows], np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _dedup(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Positions to keep: the best-ranked member of each connected group of near-identical vectors."""
    n = len(vectors)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    close = np.argwhere(np.triu(vectors @ vectors.T >= threshold, k=1))  # at most num_result_ids^2 pairs
    for a, b in close.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root stays the best-ranked member
    return np.asarray([i for i in range(n) if find(i) == i], dtype=np.int64)


def _metadata(request: Request, image_id: int, path: str, shard: int | None = None) -> dict:
    if path.startswith(("http://", "https://")):  # imported from a web data set: its URL is public already
        return {"url": path, "caption": os.path.basename(path.split("?", 1)[0])}
    base = str(request.base_url).rstrip("/")
    where = "" if shard is None else f"?shard={shard}"
    return {"url": f"{base}/api/thumbnail/{image_id}{where}", "caption": os.path.basename(path)}


def _auth(api_key: str):
    expected = api_key.encode()

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        given = request.headers.get("x-api-key")
        scheme, _, value = header.partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = value.strip()
        elif given is None and scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, ValueError):
                given = None
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise ClipBackError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY', "
                                                     "'X-API-Key: KEY', or HTTP Basic with the key as password)",
                                headers={"WWW-Authenticate": "Bearer"})

    return check
