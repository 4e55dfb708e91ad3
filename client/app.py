"""A search page and JSON API over the same client code: text or photo -> Triton -> Milvus -> product cards.

    python client/app.py --catalog ../shared/data/fashion/catalog.parquet --port 8080

API (OpenAPI schema at /docs and /openapi.json):
    GET  /api/search?q=red+kurta&k=12&mode=hybrid&colour=Red&gender=Women&min_price=10&max_price=60
                             hits, and facets (category, article type, colour, gender) over the top 100
    POST /api/search/image   (multipart: file, plus the same filters as form fields)
    GET  /api/health         which dependency is unhealthy, answered within the timeouts
    GET  /images/{id}        the product's photo from the catalog (bytes, path or URL), cacheable
    POST /api/events         shoppers' events in UBI terms: {"action_name": "click", "query_id": ..., "object_id": ...,
                             "position": 3}, or a list of them; each names a query_id a search response returned
    GET  /metrics            Prometheus: latency per stage, errors by class, the served model's fingerprint,
                             impressions and events by position and model (CTR)
Every search is logged with its query_id, model, collection and served products (client/events.py), unless --events ''.
Errors are JSON {"error": "..."}: 400 bad input, 413 upload too large, 422 an event refused (the reason), 503 Triton,
Milvus or the event store failing (or the
page overloaded: searches run --max-searches at a time, and a search that waited --timeout for its turn is refused).
No torch: tritonclient, pymilvus, fastapi.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sqlite3
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python client/app.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fastapi import FastAPI, File, Form, Query, Request, UploadFile  # noqa: E402
from fastapi.exception_handlers import request_validation_exception_handler  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from client import events as events_store  # noqa: E402
from client import serving, store  # noqa: E402
from client.admission import Overloaded, Slots, usable_cpus  # noqa: E402
from client.connection import add_connection_args  # noqa: E402
from client.deadlines import whole_seconds  # noqa: E402
from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder  # noqa: E402
from client.events import MAX_ID_CHARS, MAX_QUERIES, RETENTION_DAYS, Event, EventError, EventStore  # noqa: E402
from client.filters import filter_expression  # noqa: E402
from client.fusion import MODES  # noqa: E402
from client.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE  # noqa: E402
from client.metrics import Metrics  # noqa: E402
from client.search import Searcher, SearchResult  # noqa: E402
from core.catalog import DEFAULT_CATALOG, ColumnMap, ImageFetcher, has_image_ref, read_catalog  # noqa: E402
from core.interleaving import team_draft  # noqa: E402
from core.specs import QUERY_ENCODER  # noqa: E402

logger = logging.getLogger("client.app")
PAGE = Path(__file__).parent / "static" / "index.html"
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the image models refuse more anyway; refuse before sending it
MAX_QUERY_CHARS = 1000  # a query longer than this is not a search: a 400, before Triton or Milvus see it
# Searches at once; the rest wait in arrival order (client/admission.py). Two per core of this machine: where the
# page shares the cores with Triton and Milvus that keeps them busy without letting the tail grow
# (bench/results/service.md); where searches mostly wait on remote servers, more cores come with more slots.
# A container's CPU limit counts, not the node's cores.
MAX_SEARCHES = 2 * usable_cpus()
MAX_EVENTS_BYTES = 256 * 1024  # one POST /api/events: a page's batch of events is a few KB
EXPLORE_DEPTH = 10  # an explored search shows its top this-many in a random order (client/events.py, clickmodels)
INTERLEAVED = "interleaved"  # the model label of interleaved searches' impressions and events in /metrics
IMAGE_TYPES = {b"\xff\xd8": "image/jpeg", b"\x89P": "image/png", b"RI": "image/webp", b"GI": "image/gif"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, error_class: str = "bad_input"):
        super().__init__(message)
        self.status, self.message, self.error_class = status, message, error_class


class _Shared:
    """The Milvus client every request thread uses, and how many requests use it now."""

    def __init__(self, client):
        self.client, self.users, self.retired = client, 0, False

    def close(self) -> None:
        """Closed on a thread of its own: pymilvus closes under a process-wide lock that a connect to a dead
        server holds for its whole timeout, and no request should wait on that."""
        def close() -> None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001  (closing a broken connection must not raise)
                pass

        threading.Thread(target=close, name="milvus-close", daemon=True).start()


class Backend:
    """Triton + Milvus connections, made lazily and remade after a failure, so the page starts (and says
    what is down) even when a dependency is, and recovers by itself when it is back.

    Each request thread gets its own Triton client (tritonclient's HTTP client is not thread-safe);
    a Triton failure makes every thread remake its own. The Milvus client is shared, leased by each
    request. A connection-level failure (no answer within the deadline, unreachable) retires it and
    marks Milvus down: while it is down, one request at a time finds out whether it is back (with a new
    client), and the others are answered 503 at once with the last failure, instead of queueing behind
    connects. A retired client is closed once the last request using it is done, never under one.
    Every call has a deadline (`timeout_s`, client/deadlines.py), and locks guard only the swapping of
    references, never a network call.
    """

    def __init__(self, triton_url: str, protocol: str, milvus_uri: str, collection: str, timeout_s: float,
                 milvus_credentials: tuple[str | None, str | None, str | None]):
        self.triton_url, self.protocol, self.timeout_s = triton_url, protocol, timeout_s
        self.milvus_uri, self.collection = milvus_uri, collection
        self.credentials = milvus_credentials
        self._lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._milvus: _Shared | None = None
        self._down: str | None = None  # why Milvus is down (its last failure); None while it answers
        self._probing = False  # a request is finding out whether Milvus is back
        self._triton_generation = 0  # bumped after a Triton failure: every thread remakes its Triton client
        self._local = threading.local()

    def _admit(self) -> bool:
        """Whether this request may use Milvus; True if it is the one probing an outage. Raises StoreError
        (the last failure) while another request probes."""
        with self._lock:
            if self._down is None:
                return False
            if self._probing:
                raise store.StoreError(self._down)
            self._probing = True
            return True

    def _lease(self) -> _Shared:
        """The current Milvus client (made if there is none), counted as in use until _release."""
        with self._lock:
            if self._milvus is not None:
                self._milvus.users += 1
                return self._milvus
        with self._connect_lock:  # at start or after a failure: one thread connects, the rest use its client
            with self._lock:
                shared = self._milvus
            if shared is None:
                # Its calls never wait longer than a search's deadline, not even to load a collection.
                shared = _Shared(store.connect(self.milvus_uri, *self.credentials, self.timeout_s, self.timeout_s))
            with self._lock:
                self._milvus = shared
                shared.users += 1
                return shared

    def _release(self, shared: _Shared | None, probe: bool, verdict: str | None) -> None:
        """Done with `shared`. `verdict`: "" Milvus answered, a sentence it is down, None this request cannot tell
        (it failed before reaching Milvus)."""
        with self._lock:
            if probe:
                self._probing = False
            if verdict == "":
                self._down = None
            elif verdict:
                self._down = verdict
                if shared is not None and self._milvus is shared:
                    self._milvus, shared.retired = None, True  # new requests get a new client
            if shared is None:
                return
            shared.users -= 1
            close = shared.retired and shared.users == 0
        if close:
            shared.close()

    def _searcher(self, milvus: _Shared, collection: str) -> Searcher:
        """This thread's searcher of a serving name (the page's, or an interleaving candidate's), remade with the
        thread's clients after a Milvus or Triton failure."""
        local = self._local
        searchers = getattr(local, "searchers", None)
        if searchers is not None and (local.milvus is not milvus or local.triton != self._triton_generation):
            for stale in searchers.values():
                stale.close()  # its own Triton clients; the Milvus client is the leases' to close
            searchers = None
        if searchers is None:
            searchers = local.searchers = {}
            local.milvus, local.triton = milvus, self._triton_generation
        searcher = searchers.get(collection)
        if searcher is None:
            encoder = TritonEncoder(self.triton_url, self.protocol, timeout_s=self.timeout_s)
            try:  # the searcher checks the model set its collection records is ready
                searcher = Searcher(encoder, milvus.client, collection)
            except BaseException:
                encoder.close()
                raise
            searchers[collection] = searcher
        return searcher

    def _verdict(self, exc: BaseException) -> str | None:
        """What a request's failure says of Milvus: a sentence when it is down, "" when it answered (it refused
        one call: a filter, a missing collection), None when the request did not get that far (Triton)."""
        if isinstance(exc, store.StoreError):
            return str(exc) if exc.unavailable else ""
        if isinstance(exc, store.errors()):
            message = store.failure(exc, self.milvus_uri, whole_seconds(self.timeout_s))
            return message if store.unavailable(message) else ""
        return None

    def _using_milvus(self, work):
        """work(the shared Milvus client), through the outage gate, a lease and the failure accounting."""
        try:
            probe = self._admit()
        except store.StoreError as exc:
            raise ApiError(503, str(exc), "milvus") from None
        shared, verdict = None, None
        try:
            shared = self._lease()
            result = work(shared)
            verdict = ""
            return result
        except BaseException as exc:
            verdict = self._verdict(exc)
            raise
        finally:
            self._release(shared, probe, verdict)

    def search(self, text: str | None, image: bytes | None, k: int, expression: str,
               mode: str = "hybrid", collection: str | None = None) -> SearchResult:
        """A search of the page's serving name, or of `collection` (another serving name: a candidate's)."""
        name = collection or self.collection
        try:
            return self._using_milvus(lambda shared: self._searcher(shared, name).search(text, image, k, expression,
                                                                                         mode))
        except EncodingError as exc:
            raise ApiError(400, str(exc)) from None
        except EncoderUnavailable as exc:
            with self._lock:
                self._triton_generation += 1
            raise ApiError(503, exc.short, "triton") from None
        except store.StoreError as exc:  # down, or no such collection, or another model's: not the user's
            raise ApiError(503, str(exc), "milvus") from None
        except store.errors() as exc:
            message = store.failure(exc, self.milvus_uri, whole_seconds(self.timeout_s))
            if expression and _is_filter_error(exc):
                raise ApiError(400, f"Milvus refused the filter {expression!r}: {_message(exc)}") from None
            logger.warning("search failed: %s", message)
            raise ApiError(503, message, "milvus") from None

    def fingerprint(self) -> str:
        """The served model's fingerprint, as this thread's Triton client last read it."""
        searcher = (getattr(self._local, "searchers", None) or {}).get(self.collection)
        return searcher.fingerprint if searcher is not None else "unknown"

    def health(self) -> dict:
        """What is up: Triton through a client of its own, Milvus through the shared one (and its outage gate)."""
        out = {}
        encoder = TritonEncoder(self.triton_url, self.protocol, timeout_s=self.timeout_s)
        try:
            encoder.check_ready([QUERY_ENCODER])
            out["triton"] = "ok"
        except EncoderUnavailable as exc:
            out["triton"] = f"unhealthy: {exc.short}"
        finally:
            encoder.close()
        try:
            found = self._using_milvus(lambda shared: serving.resolve(shared.client, self.collection))
            out["milvus"] = "ok" if found else f"unhealthy: no collection {self.collection!r} (index a catalog first)"
        except store.StoreError as exc:
            out["milvus"] = f"unhealthy: {exc}"
        except ApiError as exc:
            out["milvus"] = f"unhealthy: {exc.message}"
        except store.errors() as exc:
            out["milvus"] = f"unhealthy: {store.failure(exc, self.milvus_uri, whole_seconds(self.timeout_s))}"
        return out


def _message(exc: BaseException) -> str:
    """What a pymilvus or gRPC error says, without its class's repr around it."""
    details = getattr(exc, "details", None)
    return str(getattr(exc, "message", None) or (details() if callable(details) else None) or exc)


def _is_filter_error(exc: Exception) -> bool:
    """A Milvus refusal of the expression itself (the user's filter), not a server fault."""
    text = str(exc).lower()
    return any(s in text for s in ("expr", "parse", "plan", "invalid parameter", "cannot be cast"))


class CatalogImages:
    """Product photos by id from the catalog the collection was indexed from (bytes, paths or URLs)."""

    def __init__(self, catalog: str | None, columns: ColumnMap | None):
        self.refs: dict[str, object] = {}
        self.fetch = None
        if catalog:
            df, _ = read_catalog(catalog, columns)
            self.refs = {str(i): ref for i, ref in zip(df["product_id"], df["image"]) if has_image_ref(ref)}
            self.fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))

    def remote_url(self, product_id: str) -> str | None:
        """The photo's http(s) URL when the catalog names one: the browser fetches it, not a request thread."""
        ref = self.refs.get(product_id)
        return ref if isinstance(ref, str) and ref.startswith(("http://", "https://")) else None

    def get(self, product_id: str) -> bytes | None:
        ref = self.refs.get(product_id)
        if ref is None or self.fetch is None:
            return None
        try:
            return self.fetch(ref)
        except (OSError, ValueError):
            return None


def _hits(result: SearchResult, query_id: str | None) -> dict:
    return {"query_id": query_id, "query": result.query, "mode": result.mode, "notice": result.notice,
            "embed_ms": round(result.embed_ms, 2), "search_ms": round(result.search_ms, 2),
            "hits": [{**asdict(h), "image_url": f"/images/{h.product_id}"} for h in result.hits],
            "facets": {name: [{"value": v, "count": n} for v, n in values] for name, values in result.facets.items()}}


def _filters(**values) -> str:
    """The page's filter fields (an empty form field is no filter) as a Milvus expression."""
    try:
        return filter_expression({name: None if value == "" else value for name, value in values.items()})
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 before it is spooled anywhere, by its
    Content-Length when it declares one, else as soon as the streamed bytes pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"request too large: the limit is {self.limit // (1024 * 1024)} MB"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        received, started, refused = 0, False, False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.limit:
                    # Answer now and tell the app the client left: it stops reading, and whatever it
                    # answers to that is dropped below.
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, tracking_send)


def _shopper_id(name: str, value: str | None) -> str | None:
    if value is not None and len(value) > MAX_ID_CHARS:
        raise ApiError(400, f"{name} too long: the limit is {MAX_ID_CHARS} characters")
    return value or None


def create_app(backend: Backend, images: CatalogImages, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_searches: int = MAX_SEARCHES, events: EventStore | None = None, explore_share: float = 0.0,
               seed: int | None = None, candidate: str | None = None, interleave_share: float = 0.0) -> FastAPI:
    """The page and API. `max_searches` searches run at once, the rest wait in arrival order (0: no limit).
    `events`: where searches and shoppers' events are logged (None: nothing is). `explore_share`: the share of
    searches whose top EXPLORE_DEPTH results are shown in a random order, recorded with the query, so a click
    model can tell position from attractiveness (core/clickmodels.py). `candidate`: another serving name (a
    candidate model's collection or route); `interleave_share` of searches then show the page's results and the
    candidate's merged by team draft (core/interleaving.py), each product's team logged with the query."""
    for name, share in (("explore_share", explore_share), ("interleave_share", interleave_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} is a share of searches, in [0, 1], not {share}")
    if interleave_share and not candidate:
        raise ValueError("interleaving needs a candidate serving name to interleave with")
    app = FastAPI(title="mmsearch", description="Multimodal product search: text or photo to products.",
                  version="0.1.0")
    # Multipart framing and form fields come on top of the photo itself.
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 64 * 1024)

    metrics = Metrics()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        metrics.error(exc.error_class)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """Ours, not a dependency's: logged with its traceback, answered without it."""
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        metrics.error("internal")
        return JSONResponse({"error": "internal error: the page's log says what failed"}, status_code=500)

    # Waiting for a slot is bounded by the page's deadline too: past it, the shopper hears the page is overloaded.
    slots = Slots(max_searches, backend.timeout_s) if max_searches > 0 else None
    rng = random.Random(seed)
    rng_lock = threading.Lock()

    def explored(result: SearchResult) -> bool:
        """Shuffles the top EXPLORE_DEPTH hits of an `explore_share` of searches; whether it did."""
        with rng_lock:
            if explore_share == 0.0 or rng.random() >= explore_share:
                return False
            top = result.hits[:EXPLORE_DEPTH]
            rng.shuffle(top)
        result.hits[:EXPLORE_DEPTH] = top
        return True

    def interleaved(kind: str, text: str | None, image_data: bytes | None, k: int, expression: str, mode: str,
                    result: SearchResult) -> dict | None:
        """For an `interleave_share` of searches, the candidate's results merged into `result` by team draft;
        what was done (the teams, the candidate's model and collection), or None. A candidate that fails leaves
        the page's results as they are: counted and logged, never the shopper's problem."""
        if not interleave_share or events is None:
            return None
        with rng_lock:
            if rng.random() >= interleave_share:
                return None
            draft = random.Random(rng.random())
        try:
            other = searched(kind, text, image_data, k, expression, mode, candidate)
        except ApiError as exc:
            logger.warning("the interleaving candidate %r failed: %s", candidate, exc.message)
            metrics.error("interleave")
            return None
        by_id = {h.product_id: h for h in other.hits} | {h.product_id: h for h in result.hits}
        shown = team_draft([h.product_id for h in result.hits], [h.product_id for h in other.hits], k, draft)
        result.hits = [by_id[i] for i in shown.ids]
        return {"teams": "".join(shown.teams), "candidate_model": other.model, "candidate_collection": other.collection}

    def logged(kind: str, user_query: str, result: SearchResult, attributes: dict, client_id: str | None,
               session_id: str | None, interleave: dict | None = None) -> str | None:
        """The query_id of a served search, logged with what it showed; None when logging is off or failed (the
        search is still answered: a failing store is counted and logged, never the shopper's problem)."""
        if events is None:
            return None
        if interleave is not None:  # team A: the page's model (the query's), team B: the candidate
            attributes["interleave"] = interleave
        elif explored(result):
            attributes["explore"] = f"shuffle-top-{EXPLORE_DEPTH}"
        try:
            query_id = events.log_query(kind, user_query, attributes, result.model, result.collection,
                                        [h.product_id for h in result.hits], client_id, session_id)
        except Exception:  # noqa: BLE001  (disk full, locked past its deadline: the search itself succeeded)
            logger.warning("the event store failed to log a search", exc_info=True)
            metrics.error("event_store")
            return None
        metrics.impressions(INTERLEAVED if interleave is not None else result.model, len(result.hits))
        return query_id

    def searched(kind: str, text: str | None, image_data: bytes | None, k: int, expression: str,
                 mode: str = "hybrid", collection: str | None = None) -> SearchResult:
        started = time.perf_counter()
        if slots is None:
            result = backend.search(text, image_data, k, expression, mode, collection)
        else:
            try:
                slots.acquire()
            except Overloaded as exc:
                raise ApiError(503, str(exc), "overload") from None
            try:
                metrics.queued(kind, time.perf_counter() - started)
                result = backend.search(text, image_data, k, expression, mode, collection)
            finally:
                slots.release()
        metrics.observe(kind, result.embed_ms / 1e3, result.search_ms / 1e3, time.perf_counter() - started)
        metrics.served_model(backend.fingerprint())
        return result

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("bad_input")
        return await request_validation_exception_handler(request, exc)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/api/health", summary="Which dependency is unhealthy")
    def health() -> JSONResponse:
        status = backend.health()
        ok = all(v == "ok" for v in status.values())
        return JSONResponse(status, status_code=200 if ok else 503)

    @app.get("/api/search", summary="Text search")
    def search_text(q: str = Query(..., description="what to look for, in words"),
                    k: int = Query(12, ge=1, le=100, description="number of results"),
                    mode: str = Query("hybrid", pattern=f"^({'|'.join(MODES)})$",
                                      description="hybrid: BM25 and dense fused; dense: embeddings; lexical: BM25"),
                    category: str | None = None, article_type: str | None = None, colour: str | None = None,
                    gender: str | None = None, usage: str | None = None,
                    min_price: float | None = None, max_price: float | None = None,
                    client_id: str | None = Query(None, description="the shopper's browser or app (UBI client_id)"),
                    session_id: str | None = Query(None, description="the shopper's visit (UBI session_id)")) -> dict:
        if not q.strip():
            raise ApiError(400, "empty query: type some words to search for")
        if len(q) > MAX_QUERY_CHARS:
            raise ApiError(400, f"query too long: {len(q):,} characters, the limit is {MAX_QUERY_CHARS:,}")
        client_id, session_id = _shopper_id("client_id", client_id), _shopper_id("session_id", session_id)
        expression = _filters(category=category, article_type=article_type, colour=colour, gender=gender,
                              usage=usage, min_price=min_price, max_price=max_price)
        result = searched("text", q, None, k, expression, mode)
        interleave = interleaved("text", q, None, k, expression, mode, result)
        query_id = logged("text", q, result, {"mode": result.mode, "k": k, "filter": expression},
                          client_id, session_id, interleave)
        return JSONResponse(_hits(result, query_id))

    @app.post("/api/search/image", summary="Search with a photo (JPEG, PNG or WebP)")
    def search_image(file: UploadFile = File(..., description="the photo"), k: int = Form(12, ge=1, le=100),
                     category: str | None = Form(None), article_type: str | None = Form(None),
                     colour: str | None = Form(None), gender: str | None = Form(None),
                     min_price: float | None = Form(None), max_price: float | None = Form(None),
                     client_id: str | None = Form(None), session_id: str | None = Form(None)) -> dict:
        client_id, session_id = _shopper_id("client_id", client_id), _shopper_id("session_id", session_id)
        data = file.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"upload too large: the limit is {max_upload_bytes // (1024 * 1024)} MB")
        if not data:
            raise ApiError(400, "empty upload: choose a photo")
        expression = _filters(category=category, article_type=article_type, colour=colour, gender=gender,
                              min_price=min_price, max_price=max_price)
        result = searched("image", None, data, k, expression)
        interleave = interleaved("image", None, data, k, expression, "dense", result)
        result.query = file.filename or "<image>"
        # A photo is logged by its name and digest, not its bytes: the log stays small, and the same photo
        # searched twice is recognisably one query.
        user_query = f"{result.query} sha1:{hashlib.sha1(data).hexdigest()[:16]}"
        query_id = logged("image", user_query, result, {"mode": result.mode, "k": k, "filter": expression},
                          client_id, session_id, interleave)
        return JSONResponse(_hits(result, query_id))

    @app.post("/api/events", summary="Log shoppers' events (UBI): one event or a list")
    async def log_events(request: Request) -> JSONResponse:
        """Each event names a query_id a search response returned, and the object_id and position it served
        there. All of a request's events are logged, durably, before the answer, or none are (400 unreadable
        JSON, 422 an event refused, with the reason)."""
        if events is None:
            raise ApiError(503, "event logging is off on this page (started with --events '')", "event_store")
        raw = await request.body()
        if len(raw) > MAX_EVENTS_BYTES:
            raise ApiError(413, f"events request too large: the limit is {MAX_EVENTS_BYTES // 1024} KB")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"events are JSON: {str(exc)[:200]}") from None
        try:
            parsed = [Event.parse(item) for item in (body if isinstance(body, list) else [body])]
            served = await run_in_threadpool(events.log_events, parsed)
        except EventError as exc:
            raise ApiError(422, str(exc)[:500]) from None
        except sqlite3.Error as exc:  # locked past its deadline, disk full: nothing was logged, say so
            logger.warning("the event store failed to log events: %s", exc)
            raise ApiError(503, f"the event store failed ({exc}): nothing of this request was logged",
                           "event_store") from None
        for event, query in zip(parsed, served):
            metrics.event(event.action_name, INTERLEAVED if "interleave" in query.attributes else query.model,
                          event.position)
        return JSONResponse({"logged": len(parsed)})

    @app.get("/images/{product_id}", summary="A product's photo, from the catalog")
    def image(product_id: str, request: Request) -> Response:
        url = images.remote_url(product_id)
        if url is not None:
            return RedirectResponse(url, status_code=307)
        data = images.get(product_id)
        if data is None:
            return JSONResponse({"error": f"no image for product {product_id!r}"}, status_code=404)
        etag = '"' + hashlib.sha1(data).hexdigest()[:16] + '"'
        headers = {"Cache-Control": "public, max-age=86400", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        media = next((t for magic, t in IMAGE_TYPES.items() if data.startswith(magic)), "application/octet-stream")
        return Response(data, media_type=media, headers=headers)

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/app.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the page)")
    p.add_argument("--port", type=int, default=8080, help="port of the page and API")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the product photos are served from")
    p.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_BYTES // (1024 * 1024),
                   help="largest photo accepted for image search")
    p.add_argument("--max-searches", type=int, default=MAX_SEARCHES,
                   help="searches run at once; more wait their turn in arrival order, each at most --timeout "
                        "seconds (then 503: overloaded); 0: every request thread searches at once")
    p.add_argument("--events", default=events_store.DEFAULT_PATH,
                   help="SQLite file where searches and shoppers' events are logged, shared by every page worker on "
                        "this host; '' logs nothing (responses then carry query_id null and /api/events answers 503)")
    p.add_argument("--events-retention-days", type=float, default=RETENTION_DAYS,
                   help="queries (and their events) older than this are deleted")
    p.add_argument("--events-max-queries", type=int, default=MAX_QUERIES,
                   help="at most this many queries are kept, the newest, with their events")
    p.add_argument("--explore-share", type=float, default=0.0,
                   help="share of searches (0 to 1) whose top results are shown in a random order and logged as "
                        "such, so position bias can be estimated from the logs (core/clickmodels.py)")
    p.add_argument("--candidate", default=None,
                   help="serving name (collection or route) of a candidate model to interleave with "
                        "(python -m client.interleave reads the verdict from the event log)")
    p.add_argument("--interleave-share", type=float, default=0.0,
                   help="share of searches (0 to 1) that show the page's and the candidate's results merged by team "
                        "draft; needs --candidate and the event log")
    add_connection_args(p)
    ColumnMap.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    started = time.perf_counter()
    images = CatalogImages(args.catalog, ColumnMap.from_args(args))
    logger.info("catalog images: %d products (%.1fs)", len(images.refs), time.perf_counter() - started)
    backend = Backend(args.triton_url, args.protocol, args.milvus_uri, args.collection, args.timeout,
                      (args.token, args.user, args.password))
    print(f"search page: http://{args.host}:{args.port}/  (API docs: http://{args.host}:{args.port}/docs)",
          flush=True)
    events = (EventStore(args.events, args.events_retention_days, args.events_max_queries)
              if args.events else None)
    logger.info("event log: %s", events.path if events else "off (--events '')")
    if args.interleave_share and not (args.candidate and events):
        raise SystemExit("error: --interleave-share needs --candidate and an event log (--events)")
    app = create_app(backend, images, args.max_upload_mb * 1024 * 1024, args.max_searches, events,
                     args.explore_share, candidate=args.candidate, interleave_share=args.interleave_share)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
