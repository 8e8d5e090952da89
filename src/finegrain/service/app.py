"""The HTTP service: a JSON search API and the web page, in one FastAPI app.

Endpoints (all JSON unless said otherwise; errors are ``{"error": code, "message": text}``
with a 4xx status, and never carry a traceback; a body or form field an endpoint does not declare,
say a misspelt ``treshold``, is 422 ``invalid_request``, never ignored):

=========================  =====================================================================
``GET /api/health``        ``{"status": "ok", "images": N}`` (never needs the API key)
``POST /api/search``       ``{"text" | "query" | "like", "negative", "k", "mode", "explain"}`` -> ``{"results"}``
``POST /api/search/image`` multipart: ``image`` (file), ``text``, ``negative``, ``k``, ``mode``, ``box``, ``explain``,
                           ``filters``, ``threshold``, ``offset``, ``sort``, ``variant``
``POST /api/explain``      ``{"text", "id", "mode", "k"}`` -> per sub-query the regions that scored
``POST /api/explain/image`` multipart: ``image``, ``id``, ``mode``, ``box``, ``k``
``GET /api/thumbnail/{id}`` JPEG thumbnail of an indexed image (by id; never by path)
``GET /api/images/{id}``   an indexed image's path, size, capture date, camera; ``/file``: the image itself
``GET /api/stats``         index and server statistics, search modes available, limits
``POST /api/reload``       re-open the index now if another process changed it
``GET /openapi.json``      the OpenAPI schema
``GET /``                  the web page (``/static/*`` its script and style)
=========================  =====================================================================

Build the app with :func:`create_app` and serve it with uvicorn (``finegrain serve``).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from .. import __version__, encoders, retrieval
from ..images import ImageLoadError, load_image, load_image_sized
from ..shards import ShardedIndex
from .clip_back import LARGE_BODY_PATHS, clip_back_router
from .hardening import StaticFilesNoRange
from .holder import DecodePool, IndexHolder, ThumbnailCache
from .hosts import HostCheck
from .image_routes import image_router, shard_of
from .setholder import ServedSet, SetHolder
from .slowclients import BodyTimeout

log = logging.getLogger("finegrain.service")

STATIC_DIR = Path(__file__).parent / "static"


def _known_mode(mode: str) -> str:
    retrieval.get(mode)  # ValueError (-> 422) naming the registered modes
    return mode


def _mode_schema(schema: dict) -> None:
    """The registered modes, read when the schema is generated (so plug-in modes appear too)."""
    schema["enum"] = retrieval.modes()
    schema["description"] = "; ".join(f"{m}: {d}" for m, d in retrieval.describe().items()) + \
        ". GET /api/stats lists the modes this index supports."


#: A registered search mode (which ones the open index supports: GET /api/stats).
Mode = Annotated[str, AfterValidator(_known_mode), Field(json_schema_extra=_mode_schema)]


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Anything beyond gets a 4xx JSON error."""

    max_k: int = 100  # results per search
    max_query_chars: int = 500  # characters of a text query
    max_upload_bytes: int = 10 * 2**20  # whole multipart request of an image search
    max_json_bytes: int = 64 * 2**10  # any other request body
    max_image_pixels: int = 25_000_000  # decoded size of an uploaded image (width x height)
    thumbnail_size: int = 256  # longer side of a thumbnail, pixels
    thumbnail_cache: int = 512  # thumbnails kept in memory (LRU)
    body_timeout_s: float = 15.0  # a request body stalling longer gets 408 (see slowclients.py)
    full_image_side: int = 4096  # longer side of a full image re-encoded for the browser (HEIC, TIFF...), pixels


class ApiError(HTTPException):
    """An error answered as ``{"error": code, "message": message}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request"}


# ------------------------------------------------------------------ schemas
class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("treshold") is a 422, never silently ignored

    text: str | None = Field(None, description="What to find, in words (taken literally).")
    query: str | None = Field(None, description='Instead of text: an expression such as "a beach" + "sunset" - '
                                                '"people" or 2:"red car" (docs/queries.md).')
    like: int | None = Field(None, ge=0, description="Instead of text or query: more like this indexed image "
                                                      "(its id; its file is the example image).")
    like_shard: int | None = Field(None, ge=0, description="Shard sets: the shard of the `like` image (a hit's "
                                                            "`shard`; ids are per shard).")
    negative: list[str] = Field([], description="Texts to move away from (negative terms).")
    k: int = Field(10, description="Number of results.")
    mode: Mode = Field("auto", description="auto (the default) picks the mode for the query and the index.")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if sum(v is not None for v in (self.text, self.query, self.like)) != 1:
            raise ValueError("give exactly one of text (taken literally), query (an expression) or like (an "
                             "indexed image's id)")
        if self.like_shard is not None and self.like is None:
            raise ValueError("like_shard goes with like (the shard of that image)")
        return self
    explain: bool = Field(False, description="Also explain each result (regions per sub-query).")
    filters: dict[str, Any] | None = Field(None, description=(
        "Restrict the images ranked (docs/filters.md): path_prefix, glob, taken_after, taken_before (ISO dates), "
        "make, model, orientation (landscape|portrait|square), min_width, max_width, min_height, max_height, ids."))
    threshold: float | None = Field(None, description="Drop results scoring below this.")
    offset: int = Field(0, description="Skip this many results (pagination).")
    sort: str = Field("score", description="score (best first), date (oldest first) or -date (newest first).")


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    id: int = Field(description="Image id, as returned by a search.")
    mode: Mode = "global"
    k: int = Field(10, description="The k of the search being explained (hierarchical pruning keeps k).")


class Region(BaseModel):
    field: str = Field(description="Vector field the region comes from (segments).")
    level: int = Field(description="Level index, coarse (0) to fine.")
    granularity: int = Field(description="Superpixels requested at that level.")
    box: list[int] = Field(description="x0, y0, x1, y1 in pixels of the original image.")
    score: float


class SubQuery(BaseModel):
    text: str
    full_query: bool
    score: float = Field(description="Best region score over the visited levels (global score if none).")
    best: Region | None
    levels: list[Region]


class Explanation(BaseModel):
    id: int
    mode: str
    score: float
    global_score: float
    weight_global: float
    image_size: list[int] = Field(description="width, height of the original image.")
    levels_visited: list[int]
    subqueries: list[SubQuery]


class Hit(BaseModel):
    id: int
    score: float
    rank: int
    name: str = Field(description="File name (no folders).")
    thumbnail: str = Field(description="URL of the thumbnail.")
    explanation: Explanation | None = None
    taken: str | None = Field(None, description="Capture date (EXIF, else file mtime), when sorted by date.")
    shard: int | None = Field(None, description="Shard sets: the shard holding the image (ids are per shard).")


class SearchStatsModel(BaseModel):
    sim_ops: int
    levels_visited: int
    took_ms: float


class SearchResponse(BaseModel):
    results: list[Hit]
    mode: str = Field(description="The mode that ran.")
    requested_mode: str | None = Field(None, description='"auto" when auto picked the mode that ran.')
    k: int
    subqueries: list[str] = Field(description="Sub-queries used besides the full query (multi-vector modes).")
    stats: SearchStatsModel
    generation: int = Field(description="Index generation searched.")
    offset: int = Field(0, description="Results skipped before these (pagination).")
    allowed: int | None = Field(None, description="Images the filters allowed (absent without filters).")
    partial: bool = Field(False, description="Shard sets: true when some shard could not answer (see missing).")
    missing: list[str] = Field([], description="Shard sets: the shards whose hits are absent from this answer.")


class Health(BaseModel):
    status: str = Field(description="ok, or degraded when a shard of a shard set has replicas down.")
    images: int
    shards: list[dict[str, Any]] | None = Field(None, description="Shard sets: per shard name, state, images.")


class ErrorBody(BaseModel):
    error: str
    message: str


_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorBody} for status in (400, 401, 404, 413, 422)}


# ------------------------------------------------------------------ the app
def create_app(index_path: str | os.PathLike | ShardedIndex, api_key: str | None = None,
               limits: ServiceLimits | None = None,
               reload_interval: float = 1.0, warm: bool = True, text_workers: int | None = None,
               allowed_hosts: tuple[str, ...] = (), ray: bool = False, ray_address: str | None = None,
               replicas: int = 1) -> FastAPI:
    """The service over the index at ``index_path``.

    Parameters
    ----------
    api_key:
        If set, every ``/api`` endpoint but ``/api/health`` needs it, as
        ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (UTF-8). An empty
        key is an error, not "no key".
    allowed_hosts:
        Host header values answered besides loopback names and addresses
        (``"*"``: any); other requests get 421 (DNS rebinding, see hosts.py).
    limits:
        Request limits (:class:`ServiceLimits` defaults otherwise).
    reload_interval:
        Seconds between checks for commits by other processes (``finegrain
        index``); a change re-opens the index without a restart.
    warm:
        Load the encoder and run one query now, so the first request is not slow.
    text_workers:
        Threads embedding text queries; concurrent requests' queries are
        embedded together in one batch (default: one thread per core).
    ray, ray_address, replicas:
        ``index_path`` may be a shard set (``finegrain shards``): served with threads, or with ``ray`` by
        ``replicas`` Ray actors per shard on the cluster at ``ray_address`` (see service/setholder.py).
    """
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty; give a real key, or none at all to serve without one")
    limits = limits or ServiceLimits()
    from ..shards import is_shard_set

    if ray and not isinstance(index_path, ShardedIndex) and not is_shard_set(index_path):
        raise ValueError(f"{index_path} is not a shard set; serving on Ray needs one (finegrain shards)")
    holder: IndexHolder | SetHolder
    if isinstance(index_path, ShardedIndex):  # an open set (say a RayShardSet): served as it is, refreshed in place
        holder = SetHolder(index_path.path, reload_interval, text_workers, backend=index_path)
    elif is_shard_set(index_path):
        holder = SetHolder(index_path, reload_interval, text_workers, ray=ray, ray_address=ray_address,
                           replicas=replicas)
    else:
        holder = IndexHolder(index_path, reload_interval, text_workers)
    decoder = DecodePool()  # thumbnails and uploads: a few decodes at once, in a few threads (bounded memory)
    thumbs = ThumbnailCache(limits.thumbnail_size, limits.thumbnail_cache, decoder=decoder)
    counters = {"requests": 0, "searches": 0}
    counter_lock = threading.Lock()
    started = time.time()
    if warm:
        with holder.use() as index:
            if not encoders.is_external(index.catalog.get_meta("encoder")):  # imported vectors: nothing to load
                index.embed_query(text="warm up")  # also settles the tokenizer's padding state before threads share it

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        holder.close()  # after uvicorn has finished the requests in flight
        decoder.close()

    app = FastAPI(title="finegrain", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Fine-grained image search over a finegrain index: by text or by example image, "
                              "with explanations of which regions matched each part of the query.")
    app.state.holder = holder
    app.state.limits = limits
    app.add_middleware(_BodyLimit, limit_for=lambda path: (limits.max_upload_bytes if path.endswith("/image")
                                                           or path in LARGE_BODY_PATHS else limits.max_json_bytes))
    app.add_middleware(BodyTimeout, timeout=limits.body_timeout_s)
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)  # added last: runs first
    _install_error_handlers(app)

    api = APIRouter(prefix="/api", dependencies=[Depends(_auth(api_key))] if api_key else [], responses=_ERRORS)

    def count(search: bool = False) -> None:
        with counter_lock:
            counters["requests"] += 1
            counters["searches"] += int(search)

    @app.get("/api/health", response_model=Health, response_model_exclude_none=True, tags=["service"])
    def health() -> dict:
        """Liveness and the number of indexed images."""
        count()
        with holder.use() as index:
            shards = index.shard_status() if isinstance(index, ServedSet) else None
            degraded = any(s["state"] != "up" for s in shards or ())
            return {"status": "degraded" if degraded else "ok", "images": len(index), "shards": shards}

    @api.post("/search", response_model=SearchResponse, tags=["search"])
    def search_text(body: SearchRequest, request: Request) -> dict:
        """Search by text."""
        count(True)
        k = _check_k(body.k, limits)
        shape = {"filters": body.filters, "threshold": body.threshold, "offset": body.offset, "sort": body.sort}
        if body.like is not None:
            with holder.use() as index:
                source = index if body.like_shard is None else shard_of(index, body.like_shard, ApiError)
                return _search(index, request, body.mode, k, body.explain, shape=shape,
                               query=_like_query(source, body.like, body.negative, limits, decoder))
        query = _text_query(body.text, body.query, body.negative, limits)
        with holder.use() as index:
            return _search(index, request, body.mode, k, body.explain, query=query, shape=shape)

    # Form fields are declared as Annotated[..., Form()] = default: Mode's validator (an unknown mode is a 422
    # invalid_request, as in the JSON bodies) is dropped by FastAPI when the default is Form(...).
    @api.post("/search/image", response_model=SearchResponse, tags=["search"],
              dependencies=[Depends(_known_form_fields)])
    def search_image(request: Request, image: UploadFile = File(description="The example image."),
                     k: int = Form(10), mode: Annotated[Mode, Form()] = "auto",
                     box: str | None = Form(None, description="Crop of the example: x0,y0,x1,y1 in its pixels."),
                     explain: bool = Form(False),
                     text: str | None = Form(None, description="Words to add to the example (one query of both)."),
                     negative: list[str] = Form([], description="Texts to move away from (repeatable)."),
                     filters: str | None = Form(None, description="Filters as a JSON object (see POST /api/search)."),
                     threshold: float | None = Form(None), offset: int = Form(0), sort: str = Form("score"),
                     variant: str | None = Form(None, description="l2g: paper (default) or finegrain (docs/l2g.md).")
                     ) -> dict:
        """Search by an example image (optionally a box of it, words added, negative texts, filters)."""
        count(True)
        k = _check_k(k, limits)
        bbox = _parse_box(box)
        for t in ([text] if text is not None else []) + list(negative):
            _check_text(t, limits)
        shape = {"filters": _parse_filters(filters), "threshold": threshold, "offset": offset, "sort": sort,
                 **_l2g_options(mode, variant)}
        with holder.use() as index:
            img = decoder.run(_decode_upload, image, limits, None if bbox else index.encoder.image_size)
            return _search(index, request, mode, k, explain, query=_build(text, img, bbox, negative), shape=shape)

    @api.post("/explain", response_model=Explanation, tags=["search"])
    def explain_text(body: ExplainRequest) -> dict:
        """Why image ``id`` matches a text query: per sub-query, the best region at each visited level."""
        count()
        text = _check_text(body.text, limits)
        k = _check_k(body.k, limits)
        with holder.use() as index:
            return _explain(index, body.id, body.mode, k, text=text)

    @api.post("/explain/image", response_model=Explanation, tags=["search"], dependencies=[Depends(_known_form_fields)])
    def explain_image(image: UploadFile = File(), id: int = Form(), mode: Annotated[Mode, Form()] = "global",  # noqa: A002
                      box: str | None = Form(None), k: int = Form(10)) -> dict:
        """Why image ``id`` matches an example-image query."""
        count()
        k = _check_k(k, limits)
        bbox = _parse_box(box)
        with holder.use() as index:
            img = decoder.run(_decode_upload, image, limits, None if bbox else index.encoder.image_size)
            return _explain(index, id, mode, k, image=img, bbox=bbox)

    @api.get("/thumbnail/{image_id}", tags=["images"], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail."}})
    def thumbnail(image_id: int = PathParam(ge=0, le=2**62),
                  shard: int | None = Query(None, ge=0, description="Shard sets: the hit's shard.")) -> Response:
        """A JPEG thumbnail (longer side ``thumbnail_size``) of an indexed image."""
        count()
        with holder.use() as index:
            try:
                # a shard set's image is looked up in its shard (anything with the index's get(id))
                target: Any = index.shard(shard) if isinstance(index, ServedSet) and shard is not None else index
                data = thumbs.get(target, image_id)
            except KeyError:
                raise ApiError(404, "not_found", f"no indexed image with id {image_id}") from None
            except ImageLoadError as exc:
                log.warning("thumbnail of image %d: %s", image_id, exc)
                raise ApiError(404, "image_unavailable", f"image {image_id} is indexed but its file can no "
                                                         "longer be read") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/stats", tags=["service"])
    def stats() -> dict:
        """Index statistics (counts, encoder, search modes, segment levels), limits and server counters."""
        count()
        with holder.catalog_access() as index:
            info = index.info()
        seg = index.segment_config
        modes = index.available_modes()
        info.pop("path", None)
        failures = info.pop("failures", [])
        assert holder.encoder is not None  # set when the holder first opened the index
        return {
            **info,
            "failures": len(failures),
            "modes": modes,
            "default_mode": "auto",
            "segments": {"levels": list(seg.levels), "embed": seg.embed} if seg else None,
            "limits": asdict(limits),
            "server": {"version": __version__, "uptime_s": round(time.time() - started, 1),
                       "requests": counters["requests"], "searches": counters["searches"],
                       "reloads": holder.reloads, "thumbnails_cached": len(thumbs), "rss_bytes": _rss_bytes(),
                       "text_batches": holder.encoder.batches, "texts_encoded": holder.encoder.encoded,
                       "auth": bool(api_key)},
        }

    @api.post("/reload", tags=["service"])
    def reload() -> dict:
        """Re-open the index now if another process committed to it (also done every ``reload_interval``)."""
        count()
        changed = holder.maybe_reload(force=True)
        with holder.use() as index:
            return {"reloaded": changed, "generation": holder.generation, "images": len(index)}

    api.include_router(image_router(holder, decoder.run, limits.full_image_side, count, ApiError))
    app.include_router(api)
    app.include_router(clip_back_router(api_key))  # clip-retrieval's /knn-service, /metadata, /indices-list

    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                               "style-src 'self'; script-src 'self'; connect-src 'self'",
                    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def web_page() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    app.mount("/static", StaticFilesNoRange(directory=STATIC_DIR), name="static")
    return app


# ------------------------------------------------------------------ helpers
def _build(text, image, bbox, negative, query=None) -> retrieval.Query:
    from ..retrieval.terms import build_query

    try:
        return build_query(text, image, bbox, negative or None, query=query)
    except ValueError as exc:
        raise ApiError(400, "bad_query", str(exc)) from None


def _text_query(text: str | None, query: str | None, negative: list[str], limits: ServiceLimits) -> retrieval.Query:
    """The query of ``POST /api/search``: literal ``text`` or an expression ``query``, and negative texts."""
    for t in [text if text is not None else query, *negative]:
        _check_text(t, limits)  # type: ignore[arg-type]
    if query is not None:
        from ..retrieval.terms import parse

        try:  # the service reads no paths: @ is a plain character here
            parsed = retrieval.Query(terms=tuple(parse(query, images=False)))
        except ValueError as exc:
            raise ApiError(400, "bad_query", str(exc)) from None
        return _build(None, None, None, negative, parsed)
    return _build(text, None, None, negative)


def _like_query(index, image_id: int, negative: list[str], limits: ServiceLimits, decoder) -> retrieval.Query:
    """More like indexed image ``image_id``: its file, decoded as ``Index.search(like=)`` decodes it, is the example."""
    for t in negative:
        _check_text(t, limits)
    try:
        path = index.like_path(image_id)
    except ValueError:
        raise ApiError(404, "not_found", f"no indexed image with id {image_id}") from None
    try:
        image = decoder.run(load_image, path)
    except ImageLoadError as exc:
        log.warning("more like image %d: %s", image_id, exc)
        raise ApiError(404, "image_unavailable", f"image {image_id} is indexed but its file can no longer "
                                                 "be read") from None
    return _build(None, image, None, negative)


def _l2g_options(mode: str, variant: str | None) -> dict[str, str]:
    """The ``variant`` form field of an image search as a search option (400 when it does not apply)."""
    from ..rerank.mds import VARIANTS

    if variant is None:
        return {}
    if variant not in VARIANTS:
        raise ApiError(400, "bad_query", f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if mode != "l2g":
        raise ApiError(400, "bad_query", f"variant selects the L2G re-ranking: it needs mode l2g, not {mode!r}")
    return {"variant": variant}


def _parse_filters(text: str | None) -> dict | None:
    """The ``filters`` form field of an image search: a JSON object, else 400."""
    if text is None or not text.strip():
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise ApiError(400, "bad_query", "filters must be a JSON object such as {\"glob\": \"*.jpg\"}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "bad_query", "filters must be a JSON object such as {\"glob\": \"*.jpg\"}")
    return value


def _search(index, request: Request, mode: str, k: int, explain: bool, query: retrieval.Query,
            shape: dict | None = None) -> dict:
    _check_mode(index, mode)
    t0 = time.perf_counter()
    shape = shape or {}
    try:
        response = index.search(query=query, k=k, mode=mode, **shape)
        explained = (index.explain([h.id for h in response], query=query, mode=mode, k=k,
                                   response=response) if explain and response.hits else [None] * len(response))
    except ValueError as exc:  # ImageLoadError included
        raise ApiError(400, "bad_query", str(exc)) from None
    took = (time.perf_counter() - t0) * 1000
    root = request.scope.get("root_path", "")
    results = [{"id": h.id, "score": round(h.score, 6), "rank": h.rank, "name": os.path.basename(h.path),
                "thumbnail": f"{root}/api/thumbnail/{h.id}" + ("" if h.shard is None else f"?shard={h.shard}"),
                "explanation": e.as_dict() if e else None, "taken": h.taken, "shard": h.shard}
               for h, e in zip(response, explained)]
    return {"results": results, "mode": response.mode, "requested_mode": response.requested_mode, "k": k,
            "subqueries": list(response.subqueries[1:]),
            "stats": {"sim_ops": int(response.stats.sim_ops), "levels_visited": int(response.stats.levels_visited),
                      "took_ms": round(took, 3)},
            "generation": response.generation, "offset": int(shape.get("offset") or 0),
            "allowed": response.allowed, "partial": bool(response.partial), "missing": list(response.partial)}


def _explain(index, image_id: int, mode: str, k: int, text=None, image=None, bbox=None) -> dict:
    _check_mode(index, mode)
    try:
        return index.explain([image_id], text=text, image=image, bbox=bbox, mode=mode, k=k)[0].as_dict()
    except KeyError:
        raise ApiError(404, "not_found", f"no indexed image with id {image_id}") from None
    except ValueError as exc:
        raise ApiError(400, "bad_query", str(exc)) from None


def _check_mode(index, mode: str) -> None:
    modes = index.available_modes()
    if mode not in modes:
        raise ApiError(400, "mode_unavailable", f"search mode {mode!r} is not available on this index; "
                                                f"it supports: {', '.join(modes)}")


def _accepted_fields(route: Any) -> list[str]:
    """The body fields ``route`` takes: its JSON model's fields, or its form fields (files included)."""
    params = list(getattr(getattr(route, "dependant", None), "body_params", None) or ())
    if len(params) == 1:
        model = params[0].field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            return [info.alias or name for name, info in model.model_fields.items()]
    return [param.alias for param in params]


async def _known_form_fields(request: Request) -> None:
    """Dependency of the upload endpoints: a form field the endpoint does not declare ("treshold") is a 422,
    as an unknown key of a JSON body is (``extra="forbid"``), never silently ignored."""
    accepted = set(_accepted_fields(request.scope.get("route")))
    form = await request.form()  # parsed already for the endpoint's own fields: this is the same, cached, form
    unknown = sorted(set(form.keys()) - accepted)
    if unknown:
        raise RequestValidationError([{"type": "extra_forbidden", "loc": ("body", name),
                                       "msg": "Extra inputs are not permitted"} for name in unknown])


def _check_text(text: str, limits: ServiceLimits) -> str:
    if not text.strip():
        raise ApiError(400, "bad_query", "the text query is empty")
    if len(text) > limits.max_query_chars:
        raise ApiError(413, "query_too_long", f"the text query has {len(text)} characters; the limit is "
                                              f"{limits.max_query_chars}")
    return text


def _check_k(k: int, limits: ServiceLimits) -> int:
    if not 1 <= k <= limits.max_k:
        raise ApiError(400, "bad_k", f"k must be between 1 and {limits.max_k}, not {k}")
    return k


def _parse_box(box: str | None) -> tuple[float, float, float, float] | None:
    if box is None or not box.strip():
        return None
    parts = [p for p in re.split(r"[\s,]+", box.strip()) if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ApiError(400, "bad_box", "box must be four numbers x0,y0,x1,y1 (pixels of the uploaded image)")
    return values


def _decode_upload(upload: UploadFile, limits: ServiceLimits, draft_size: int | None):
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "upload_too_large", f"the image is larger than {limits.max_upload_bytes} bytes")
    if not data:
        raise ApiError(400, "bad_image", "the uploaded image is empty")
    size = _declared_size(data)
    if size and size[0] * size[1] > limits.max_image_pixels:
        raise ApiError(413, "image_too_large", f"the image is {size[0]}x{size[1]} pixels; the limit is "
                                               f"{limits.max_image_pixels} pixels")
    try:
        return load_image_sized(data, max_pixels=limits.max_image_pixels, draft_size=draft_size)[0]
    except ImageLoadError as exc:
        raise ApiError(400, "bad_image", f"the uploaded image cannot be read: {exc}") from None


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the image header, without decoding (None if unreadable: the loader says why)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any decoder complaint is reported by load_image_sized
        return None


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _auth(api_key: str):
    expected = api_key.encode("utf-8")
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer API_KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: API_KEY")

    def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer),
              key: str | None = Depends(header)) -> None:
        given = key if key is not None else (creds.credentials if creds is not None else None)
        # Header values arrive as latin-1 text: back to the bytes the client sent (UTF-8 for a non-ASCII key).
        if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), expected):
            raise ApiError(401, "unauthorized", "missing or wrong API key (send 'Authorization: Bearer KEY' "
                                                "or 'X-API-Key: KEY')", headers={"WWW-Authenticate": "Bearer"})

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or _CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())[:10]
        details = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "invalid"))} for e in errors]
        lines = [f"{'.'.join(d['loc'])}: {d['msg']}" for d in details]
        unknown = [repr(d["loc"][1])[:80] for d, e in zip(details, errors)
                   if e.get("type") == "extra_forbidden" and len(d["loc"]) == 2 and d["loc"][0] == "body"]
        if unknown:  # a misspelt field ("treshold"): say which, and what the endpoint takes, in one line
            accepted = _accepted_fields(request.scope.get("route"))
            lines = [f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
                     + (f" (this endpoint takes: {', '.join(accepted)})" if accepted else ""),
                     *(line for line, e in zip(lines, errors) if e.get("type") != "extra_forbidden")]
        message = "; ".join(lines) or "invalid request"
        return JSONResponse({"error": "invalid_request", "message": message, "details": details}, status_code=422)

    from ..shards import ShardUnavailable
    from ..store.catalog import IndexFormatError

    @app.exception_handler(ShardUnavailable)
    async def shards_down(request: Request, exc: ShardUnavailable) -> JSONResponse:
        # every shard of a set is down (one shard down gives a partial answer, not this)
        return JSONResponse({"error": "shards_unavailable", "message": str(exc)}, status_code=503)

    @app.exception_handler(IndexFormatError)
    async def index_damaged(request: Request, exc: IndexFormatError) -> JSONResponse:
        # a damaged chunk (found on first read, or recorded by `finegrain check`): refused, never a ranking
        return JSONResponse({"error": "index_damaged", "message": str(exc)}, status_code=503)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal", "message": "internal server error"}, status_code=500)


class _BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, "body_too_large", f"the request body is larger than {limit} bytes")


_DRAIN_MAX = 32 * 2**20  # oversized bodies up to this size are read and dropped before the 413


class _BodyLimit:
    """ASGI middleware: refuse request bodies over a per-path limit (declared or streamed) with 413."""

    def __init__(self, app, limit_for):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            error = _BodyTooLarge(limit) if declared.isdigit() else ApiError(400, "bad_request", "bad Content-Length")
            headers = {}
            if declared.isdigit() and int(declared) <= _DRAIN_MAX:
                # Read (and drop) a moderately oversized body first: a client still sending when the
                # server closes gets a connection reset instead of this answer.
                while (await receive()).get("more_body", False):
                    pass
            else:
                headers["Connection"] = "close"
            response = JSONResponse({"error": error.code, "message": error.detail}, status_code=error.status_code,
                                    headers=headers)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        return await self.app(scope, limited_receive, send)
