"""The Milvus collection of product embeddings: schema, index, upsert, search.

One module for index.py and search.py, so both use the same names and the same metric. The
same code serves Milvus Lite (a local file: `runs/milvus.db`) and Milvus standalone or cluster
(`http://host:19530`); nothing here depends on which.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from client import result_columns
from client.capabilities import capabilities
from client.deadlines import BATCH_TIMEOUT_S, LITE_START_TIMEOUT_S, SEARCH_TIMEOUT_S, DeadlineClient
from core.preprocess import product_text

logger = logging.getLogger(__name__)

DEFAULT_URI = os.environ.get("MILVUS_URI", "runs/milvus.db")
COLLECTION = "products"
ID = "product_id"
VECTOR = "embedding"
METRIC = "IP"  # the default: inner product on unit vectors = cosine
METRICS = ("IP", "COSINE", "L2")  # all rank unit vectors identically; the collection records its own
# Scalar fields kept for filtering and display: name -> max VARCHAR length (None = FLOAT).
SCALARS: dict[str, int | None] = {
    "title": 512, "master_category": 64, "sub_category": 64, "article_type": 64,
    "base_colour": 64, "usage": 64, "gender": 32, "price": None,
}
OUTPUT_FIELDS = list(SCALARS)
ID_MAX_LENGTH = 256
MODEL_KEY = "model_fingerprint"  # in the collection's description: which model made its vectors
TAG_KEY = "model_tag"  # ... and which Triton model set serves that model (core.specs.model_name)
PREVIOUS_KEY = "previous"  # ... and which collection the alias served before it (an upgrade's rollback)
UNKNOWN = "unknown"  # what a repository exported before fingerprints reports
# Lexical search: Milvus's own BM25 over the product text (title + description), next to the vector.
TEXT = "text"  # what BM25 reads: core.preprocess.product_text
TEXT_MAX_LENGTH = 2048
SPARSE = "text_bm25"  # filled by Milvus from TEXT (a BM25 function): never written by the client
# The standard analyzer splits "EF-503L-1AVDF" into ef / 503l / 1avdf, in the catalog and in the
# query alike: 100% of the code and rare-name sets at rank 1, against 7% (codes) for whitespace +
# lowercase (bench/results/hybrid.md).
ANALYZER = {"type": "standard"}
# Catalog sync (client/sync.py): content digests per row, so a re-run embeds only what changed.
EMBED_DIGEST = "embed_digest"  # over the model's input: title, description, image bytes
ROW_DIGEST = "row_digest"  # over every stored field
DIGEST_LENGTH = 32  # hex characters
INDEX_PARAMS = {"AUTOINDEX": {}, "FLAT": {}, "IVF_FLAT": {"nlist": 256}, "HNSW": {"M": 16, "efConstruction": 200}}
SEARCH_PARAMS = {"AUTOINDEX": {}, "FLAT": {}, "IVF_FLAT": {"nprobe": 32}, "HNSW": {"ef": 64}}


def search_params(index_type: str, k: int) -> dict:
    """Search parameters for an index type and a top-k: HNSW's `ef` is never below k (its candidate
    list; a smaller one cuts top-k recall, as measured on the server: R@100 0.893 -> 0.837)."""
    params = dict(SEARCH_PARAMS.get(index_type, {}))
    if "ef" in params:
        params["ef"] = max(params["ef"], k)
    return params


class StoreError(RuntimeError):
    """The collection is missing, of another dimension, or Milvus is unreachable (`unavailable`)."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class Hit:
    product_id: str
    score: float
    fields: dict


# pymilvus pings its connection every 10 s, with or without calls. gRPC's default server policy (Milvus Lite
# served over TCP: `make serve`) refuses pings more often than every 5 minutes while no data flows: it answered
# with GOAWAY "too many pings" once, and the page's next search failed (a 503 in bench/event_logging.py, after a
# page sat idle following load; not reproduced on demand). Every call has a deadline, so idle pings find
# nothing a deadline would not: none without calls, and at the server's minimum during them. Milvus standalone
# accepts either.
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 300_000, "grpc.keepalive_permit_without_calls": False}


def connect(uri: str = DEFAULT_URI, token: str | None = None, user: str | None = None,
            password: str | None = None, timeout_s: float = SEARCH_TIMEOUT_S,
            batch_timeout_s: float = BATCH_TIMEOUT_S) -> DeadlineClient:
    """A MilvusClient whose every call has a deadline: `timeout_s` for reads and searches, `batch_timeout_s`
    for writes, loads and collection changes (client/deadlines.py). Credentials come from arguments or
    MILVUS_TOKEN / MILVUS_USER / MILVUS_PASSWORD."""
    with warnings.catch_warnings():
        # milvus_lite 2.5 imports pkg_resources, whose deprecation notice every command would print.
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        try:
            import milvus_lite  # noqa: F401
        except ImportError:  # a server-only install: nothing to quieten
            pass
    from pymilvus import MilvusClient

    result_columns.install()  # the page's 100-deep results, decoded a column at a time
    token = token or os.environ.get("MILVUS_TOKEN") or ""
    user = user or os.environ.get("MILVUS_USER") or ""
    password = password or os.environ.get("MILVUS_PASSWORD") or ""
    if is_lite(uri):
        os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    try:
        # Its own connection (gRPC channel): pymilvus otherwise shares one per address in the process, which
        # a failure puts into reconnection for every client at once, and a client made to replace a broken
        # one (the page after an outage) would inherit the broken channel.
        # Opening a Lite file starts its engine in this process: not a network wait, and slower on a busy machine.
        connect_s = max(timeout_s, LITE_START_TIMEOUT_S) if is_lite(uri) else timeout_s
        try:
            client = MilvusClient(uri=uri, token=token, user=user, password=password, timeout=connect_s,
                                  dedicated=True, grpc_options=GRPC_OPTIONS)
        except Exception as exc:  # noqa: BLE001
            if not is_lite(uri):
                raise
            # A Lite engine that did not come up (seen on a loaded CI machine): start it once more, loudly.
            logger.warning("opening the Milvus Lite file %s failed (%s): starting its engine again", uri,
                           failure(exc, uri))
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)
            client = MilvusClient(uri=uri, token=token, user=user, password=password, timeout=connect_s,
                                  dedicated=True, grpc_options=GRPC_OPTIONS)
        # pymilvus repairs a connection that failed in place, under a process-wide lock held while it waits
        # for the server, then retries with a backoff that overshoots the deadline: requests in flight when
        # Milvus died queued behind one another's repairs. Here an unreachable server fails the call at
        # once, and the caller replaces the client (the page) or the command stops and resumes.
        handler = getattr(client, "_handler", None)
        if handler is not None and hasattr(handler, "_on_rpc_error"):
            handler._on_rpc_error = _fail_unreachable
    except Exception as exc:
        message = failure(exc, uri, timeout_s)
        raise StoreError(message.replace(password, "***") if password else message,  # never echo it
                         unavailable(message)) from None
    return DeadlineClient(client, timeout_s, batch_timeout_s)


def errors() -> tuple[type[BaseException], ...]:
    """What a Milvus call raises when it fails (pymilvus's own, or gRPC's for a deadline): for except clauses."""
    import grpc
    from pymilvus.exceptions import MilvusException

    return MilvusException, grpc.RpcError


def _fail_unreachable(error: BaseException) -> bool:
    """pymilvus's hook for a failed call (its retry loop calls it): raise an unreachable server's error now."""
    import grpc

    if isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE:
        raise error
    return False  # anything else: pymilvus's own rules (a rate limit is retried within the deadline)


def failure(exc: BaseException, uri: str, timeout_s: float | None = None) -> str:
    """One sentence for a Milvus call that failed: what is wrong, never a Python object's repr."""
    import grpc

    code = exc.code() if isinstance(exc, grpc.RpcError) else getattr(exc, "code", None)
    message = exc.details() if isinstance(exc, grpc.RpcError) else getattr(exc, "message", None) or str(exc)
    text = f"{code} {message}".lower()
    if code in (grpc.StatusCode.UNAVAILABLE, 2) or any(
            s in text for s in ("fail connecting", "unavailable", "closed channel", "connection refused")):
        return f"Milvus at {uri} {UNREACHABLE} (start it, or pass --milvus-uri to reach yours)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "deadline" in text or "timeout" in text:
        return f"Milvus at {uri} {SILENT} " + (f"within {timeout_s:g} s" if timeout_s else "in time")
    return f"Milvus at {uri} failed: {re.sub(r'<[^<>]* at 0x[0-9a-f]+>', 'a request', str(message))}"


UNREACHABLE, SILENT = "is unreachable", "did not answer"  # what failure() says of a Milvus that is down


def unavailable(message: str) -> bool:
    """Whether a failure() sentence says Milvus is down, rather than that it refused one call."""
    return UNREACHABLE in message or SILENT in message


def collection_dim(client, collection: str = COLLECTION) -> int | None:
    if not client.has_collection(collection):
        return None
    for f in client.describe_collection(collection)["fields"]:
        if f["name"] == VECTOR:
            return int(f["params"]["dim"])
    raise StoreError(f"collection {collection!r} has no vector field {VECTOR!r}: not made by client/index.py")


def collection_index(client, collection: str = COLLECTION) -> tuple[str, str]:
    """(index type, metric) of the collection's vector index: what every search must use, read from
    the collection so that no user can mistype them."""
    info = client.describe_index(collection, VECTOR)
    return str(info.get("index_type") or "AUTOINDEX"), info["metric_type"]


def collection_metric(client, collection: str = COLLECTION) -> str:
    """The metric the collection's vector index was built with: what every search must use."""
    return collection_index(client, collection)[1]


def ensure_collection(client, dim: int, collection: str = COLLECTION, index_type: str | None = None,
                      metric: str = METRIC, fingerprint: str | None = None, tag: str = "",
                      previous: str | None = None) -> None:
    """Create the collection (schema + vector index) unless it exists with the same dimension and model.

    The collection's description records `fingerprint` (the served model's, see check_model), the
    Triton model set `tag` that serves it, and the `previous` collection an upgrade replaces.
    `index_type` None is the best the server has (HNSW on a server, AUTOINDEX on Lite). The BM25
    field is made where the server has full-text search (Milvus 2.5+ and Lite 2.5); a server without
    it gets a dense-only collection and a warning that says what is lost.
    """
    existing = collection_dim(client, collection)
    if existing is not None:
        if existing != dim:
            raise StoreError(f"collection {collection!r} holds {existing}-d vectors but the served model makes "
                             f"{dim}-d ones: index into a new --collection, or drop it (--recreate)")
        check_model(client, collection, fingerprint)
        client.load_collection(collection)  # a restarted server holds it unloaded until asked (2.3)
        return
    caps = capabilities(client)
    index_type = index_type or caps.best_index()
    if metric not in METRICS:
        raise StoreError(f"unknown metric {metric!r}: expected one of {METRICS}")
    if index_type not in caps.index_types:
        raise StoreError(f"{caps.server} has no {index_type} index: use one of {list(caps.index_types)}")
    record = {MODEL_KEY: fingerprint if fingerprint != UNKNOWN else None, TAG_KEY: tag or None, PREVIOUS_KEY: previous}
    description = json.dumps({k: v for k, v in record.items() if v}) if any(record.values()) else ""

    if not caps.bm25:
        logger.warning("%s has no BM25 full-text search: collection %s is dense-only, so lexical and hybrid "
                       "search fall back to dense (model codes and rare names are then rarely found). Milvus 2.5+ "
                       "or Lite 2.5 (make serve) have it", caps.server, collection)
    schema, index = _schema(client, dim, description, caps.bm25), client.prepare_index_params()
    index.add_index(VECTOR, index_type=index_type, metric_type=metric, params=INDEX_PARAMS[index_type])
    if caps.bm25:
        index.add_index(SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    client.create_collection(collection, schema=schema, index_params=index)
    logger.info("created collection %s (%d-d, %s, %s%s)", collection, dim, index_type, metric,
                ", BM25" if caps.bm25 else "")


def is_lite(uri: str) -> bool:
    """A Milvus Lite file (one process per file) rather than a server's address."""
    return not re.match(r"^(https?|tcp|grpc)://", uri)


def description(client, collection: str) -> tuple[str, dict]:
    """(the collection's own name, the record in its description: model, tag, previous). An alias
    made by an older release is followed to its collection."""
    info = client.describe_collection(collection)
    try:
        record = json.loads(info.get("description") or "{}")
    except ValueError:
        record = {}
    return info.get("collection_name") or collection, record if isinstance(record, dict) else {}


def check_model(client, collection: str, fingerprint: str | None) -> None:
    """Refuse to mix models: a query embedded by one model is meaningless against another's vectors,
    even when both have the same dimension."""
    require_same_model(collection, description(client, collection)[1].get(MODEL_KEY), fingerprint)


def require_same_model(collection: str, recorded: str | None, fingerprint: str | None) -> None:
    """check_model on a fingerprint already read (a CollectionRecord's): unknown on either side passes."""
    if recorded and fingerprint and fingerprint != UNKNOWN and recorded != fingerprint:
        raise StoreError(f"collection {collection!r} holds vectors of model {recorded}, but Triton serves model "
                         f"{fingerprint}: index the catalog into a new --collection with this model (or --recreate "
                         "this one), or serve the model the collection was built with")


def _schema(client, dim: int, description: str, lexical: bool):
    """The collection's fields: id, vector, the scalars; with `lexical`, the text and its BM25 field."""
    from pymilvus import DataType, Function, FunctionType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False, description=description)
    schema.add_field(ID, DataType.VARCHAR, is_primary=True, max_length=ID_MAX_LENGTH)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dim)
    for name, length in SCALARS.items():
        if length is None:
            schema.add_field(name, DataType.FLOAT)
        else:
            schema.add_field(name, DataType.VARCHAR, max_length=length)
    for name in (EMBED_DIGEST, ROW_DIGEST):
        schema.add_field(name, DataType.VARCHAR, max_length=DIGEST_LENGTH)
    if lexical:
        schema.add_field(TEXT, DataType.VARCHAR, max_length=TEXT_MAX_LENGTH, enable_analyzer=True,
                         analyzer_params=ANALYZER)
        schema.add_field(SPARSE, DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="text_bm25", function_type=FunctionType.BM25, input_field_names=[TEXT],
                                     output_field_names=[SPARSE]))
    return schema


def _has_field(client, collection: str, name: str) -> bool:
    return any(f["name"] == name for f in client.describe_collection(collection)["fields"])


def has_lexical(client, collection: str = COLLECTION) -> bool:
    """Whether the collection holds the BM25 field (collections made before it did not)."""
    return _has_field(client, collection, SPARSE)


def has_digests(client, collection: str = COLLECTION) -> bool:
    """Whether the collection's rows carry content digests (collections made before sync do not)."""
    return _has_field(client, collection, EMBED_DIGEST)


def _clip(value: str, length: int) -> str:
    encoded = value.encode("utf-8")[:length]
    return encoded.decode("utf-8", errors="ignore")


def make_row(product: Mapping, vector: Sequence[float], lexical: bool = True,
             digests: tuple[str, str] | None = ("", "")) -> dict:
    """A collection row; `lexical` adds the text BM25 reads (a collection without the field refuses it),
    `digests` the (embed, row) content digests of client/sync.py (empty ones: the next sync re-embeds
    the row; None: a collection made before digests)."""
    row = {ID: str(product[ID])[:ID_MAX_LENGTH], VECTOR: [float(x) for x in vector]}
    if digests is not None:
        row[EMBED_DIGEST], row[ROW_DIGEST] = digests
    if lexical:
        row[TEXT] = _clip(product_text(product.get("title"), product.get("description")), TEXT_MAX_LENGTH)
    for name, length in SCALARS.items():
        value = product.get(name)
        if length is None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = float("nan")
            row[name] = value if math.isfinite(value) else -1.0  # -1: no price (NaN cannot be filtered)
        else:
            row[name] = _clip("" if value is None or value != value else str(value), length)
    return row


def upsert(client, rows: list[dict], collection: str = COLLECTION) -> int:
    """Insert or replace rows by product id: re-indexing never duplicates."""
    if not rows:
        return 0
    return int(client.upsert(collection, rows)["upsert_count"])


def existing_ids(client, ids: Iterable[str], collection: str = COLLECTION, chunk: int = 1000) -> set[str]:
    """Which of `ids` the collection already holds (how an interrupted index run resumes)."""
    ids = list(ids)
    found: set[str] = set()
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        rows = client.get(collection, ids=part, output_fields=[ID], consistency_level="Strong")
        found.update(r[ID] for r in rows)
    return found


def read_digests(client, collection: str = COLLECTION, batch: int = 5000) -> dict[str, tuple[str, str]]:
    """{product id: (embed digest, row digest)} for every row of the collection (strong consistency)."""
    iterator = client.query_iterator(collection, batch_size=batch, filter="",
                                     output_fields=[ID, EMBED_DIGEST, ROW_DIGEST], consistency_level="Strong")
    digests: dict[str, tuple[str, str]] = {}
    try:
        while rows := iterator.next():
            digests.update((r[ID], (r[EMBED_DIGEST], r[ROW_DIGEST])) for r in rows)
    finally:
        iterator.close()
    return digests


def read_vectors(client, ids: Sequence[str], collection: str = COLLECTION, chunk: int = 1000) -> dict[str, list]:
    """{product id: stored vector} (a row whose fields change but whose model input does not keeps it)."""
    vectors: dict[str, list] = {}
    for start in range(0, len(ids), chunk):
        rows = client.get(collection, ids=list(ids[start:start + chunk]), output_fields=[ID, VECTOR],
                          consistency_level="Strong")
        vectors.update((r[ID], r[VECTOR]) for r in rows)
    return vectors


def delete(client, ids: Sequence[str], collection: str = COLLECTION, chunk: int = 1000) -> int:
    deleted = 0
    for start in range(0, len(ids), chunk):
        part = list(ids[start:start + chunk])
        client.delete(collection, ids=part)
        deleted += len(part)
    return deleted


def count(client, collection: str = COLLECTION) -> int:
    """Rows in the collection, read with strong consistency: a Milvus server counts what was just written."""
    rows = client.query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(rows[0]["count(*)"])


def _hits(results) -> list[list[Hit]]:
    return [[Hit(str(h["id"]), float(h["distance"]), dict(h["entity"])) for h in hits] for hits in results]


def search(client, vectors: Sequence[Sequence[float]], k: int = 10, collection: str = COLLECTION,
           expression: str = "", index: tuple[str, str] | None = None) -> list[list[Hit]]:
    """Top-k products per query vector, best first, with their scalar fields.

    `index` (index type, metric) defaults to the collection's own (one describe call; pass
    `collection_index(...)` to save that call).
    """
    index_type, metric = index or collection_index(client, collection)
    params = {"metric_type": metric, "params": search_params(index_type, k)}
    results = client.search(collection, data=[list(map(float, v)) for v in vectors], anns_field=VECTOR,
                            limit=k, search_params=params, filter=expression, output_fields=OUTPUT_FIELDS)
    return _hits(results)


def lexical_search(client, texts: Sequence[str], k: int = 10, collection: str = COLLECTION,
                   expression: str = "") -> list[list[Hit]]:
    """Top-k products per query text by BM25 over the product text, best first (score = BM25).

    The text is data, never expression syntax. A text with no searchable token (only punctuation,
    say) finds nothing.
    """
    results = client.search(collection, data=[t[:TEXT_MAX_LENGTH] for t in texts], anns_field=SPARSE, limit=k,
                            search_params={"metric_type": "BM25"}, filter=expression,
                            output_fields=OUTPUT_FIELDS)
    return _hits(results)
