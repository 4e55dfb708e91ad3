"""Search the indexed catalog by text or by image, through Triton and Milvus.

    python client/search.py "red kurta for women"
    python client/search.py "running shoes" -k 5 --gender Men --max-price 40
    python client/search.py --image photo.jpg --json
    python client/search.py "watch" --filter 'price < 50 and usage == "Formal"'
    python client/search.py "PL13090JS-28E" --mode lexical     # hybrid (the default) finds it too
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python client/search.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import serving, store
from client.capabilities import lexical_missing
from client.connection import add_connection_args, connect
from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder
from client.filters import FILTERS, filter_expression
from client.fusion import MODES, combine, facet_counts
from core.fusion_rule import FusionRule, ranking_model
from core.specs import QUERY_ENCODER

logger = logging.getLogger("client.search")

FACET_DEPTH = 100  # facets count the values among this many top hits


@dataclass
class SearchResult:
    query: str
    hits: list[store.Hit]
    embed_ms: float
    search_ms: float
    mode: str = "dense"  # how it was searched (a photo, or a collection without BM25, is dense)
    facets: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    notice: str = ""  # one line for the user when the search was not what was asked (a fallback)
    collection: str = ""  # the collection searched (behind the serving name)
    model: str = ""  # the model that made the collection's vectors, or the query model set routed to them


RESOLVE_EVERY_S = 1.0  # how often a searcher asks which collection its serving name points at


@dataclass
class Target:
    """One collection and the encoder of the model that made its vectors: a query is embedded and
    searched with the same pair, so a switch (an upgrade's alias) never mixes two models."""

    record: serving.CollectionRecord
    encoder: TritonEncoder  # the collection's own model set: embeds photos
    query_encoder: TritonEncoder  # embeds text: the same, or a query model set trained into its product space
    index: tuple[str, str]  # (index type, metric)
    lexical: bool
    load_ms: float
    checked: float  # time.monotonic() of the last resolution that confirmed it
    fusion_rule: FusionRule | None  # the query model set's hybrid fusion (None: the shipped rule), read once
    model: str  # what ranks its searches: the query model's fingerprint with its fusion rule (events, interleaving)


class Searcher:
    """Embeds through Triton, searches Milvus; refuses a collection of another dimension or model.

    `collection` is a serving name: a collection, or a name an upgrade routes (client/serving.py).
    It is resolved at most every RESOLVE_EVERY_S; each search uses one resolution for both its embedding
    (the model set the collection records) and its search (that collection, by its own name).
    """

    def __init__(self, encoder: TritonEncoder, client, collection: str = store.COLLECTION):
        self.encoder, self.client, self.collection = encoder, client, collection
        encoder.check_ready(())  # Triton first: an outage of both says Triton, as the page's status does
        self._encoders = {encoder.tag: encoder}
        # A hybrid query's BM25 search, beside its embedding. One thread: a searcher serves one caller at a time
        # (the page keeps one per worker thread).
        self._pool: ThreadPoolExecutor | None = None
        self._target: Target | None = None
        self.target()

    def target(self) -> Target:
        now = time.monotonic()
        current = self._target
        if current is not None and now - current.checked < RESOLVE_EVERY_S:
            return current
        record = serving.collection_record(self.client, self.collection)
        if current is not None and record == current.record:
            current.checked = now
            return current
        self._target = self._open(record, now)
        if current is not None:
            logger.info("%s now serves collection %s (model %s)", self.collection, record.collection,
                        record.fingerprint)
        return self._target

    def _encoder(self, tag: str) -> TritonEncoder:
        encoder = self._encoders.get(tag)
        if encoder is None:
            encoder = self._encoders[tag] = self.encoder.with_tag(tag)
        return encoder

    def _open(self, record: serving.CollectionRecord, now: float) -> Target:
        encoder, query_encoder = self._encoder(record.tag), self._encoder(record.query_model_set)
        query_encoder.check_ready([QUERY_ENCODER])
        name = record.collection
        dim = store.collection_dim(self.client, name)
        if dim != query_encoder.embed_dim:
            raise store.StoreError(
                f"collection {name!r} holds {dim}-d vectors but the served model makes {query_encoder.embed_dim}-d "
                "ones: it was indexed with another model. Re-index (python client/index.py --recreate).")
        if record.query_tag is None:
            store.require_same_model(name, record.fingerprint, encoder.fingerprint)  # read with the record
        elif record.fingerprint != query_encoder.product_space:
            raise store.StoreError(
                f"query model set {record.query_tag!r} embeds into the product space of model "
                f"{query_encoder.product_space}, but collection {name!r} holds vectors of model {record.fingerprint}: "
                "route the name to a collection of that model, or roll back (python client/upgrade.py --rollback)")
        index, lexical = store.collection_index(self.client, name), store.has_lexical(self.client, name)
        # Loading the collection into memory is a one-off cost of a process (about a second at
        # 44k products with Milvus Lite); done here, it is not charged to the first search.
        started = time.perf_counter()
        self.client.load_collection(name)
        # The collection's own model, or the query model set routed to it; its config was read above.
        fingerprint = (record.fingerprint or "") if record.query_tag is None else query_encoder.fingerprint
        rule = query_encoder.fusion_rule
        return Target(record, encoder, query_encoder, index, lexical, (time.perf_counter() - started) * 1e3, now,
                      rule, ranking_model(fingerprint, rule))

    @property
    def index(self) -> tuple[str, str]:
        return self.target().index

    @property
    def metric(self) -> str:
        return self.target().index[1]

    @property
    def lexical(self) -> bool:
        return self.target().lexical

    @property
    def load_ms(self) -> float:
        return self.target().load_ms

    @property
    def fingerprint(self) -> str:
        """The model that embeds text queries for the collection last resolved (no call to Milvus)."""
        return (self._target.query_encoder if self._target is not None else self.encoder).fingerprint

    def _lexical_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="bm25")
        return self._pool

    def close(self) -> None:
        for encoder in self._encoders.values():
            encoder.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def search(self, text: str | None = None, image: bytes | None = None, k: int = 10,
               expression: str = "", mode: str = "hybrid") -> SearchResult:
        """Top-k products for a text (in `mode`: hybrid, dense or lexical) or a photo (dense: it has no words)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if image is None and (text is None or not text.strip()):
            raise EncodingError("nothing to search: give a query text or an image")
        target = self.target()
        collection, encoder = target.record.collection, target.encoder
        depth, notice = max(k, FACET_DEPTH), ""
        if image is not None:
            mode = "dense"
        elif mode != "dense" and not target.lexical:
            notice = lexical_missing(self.client, collection)
            mode = "dense"
        started = time.perf_counter()
        # BM25 needs no embedding: a hybrid query's lexical search runs beside its embedding and dense search.
        lexical_search = (self._lexical_pool().submit(store.lexical_search, self.client, [text], depth, collection,
                                                      expression) if mode == "hybrid" else None)
        vector = None
        try:
            if image is not None:
                vector = encoder.embed_images([image])[0]
            elif mode != "lexical":
                vector = target.query_encoder.embed_queries([text])[0]
            embedded = time.perf_counter()
            dense = ([] if vector is None else
                     store.search(self.client, [vector], depth, collection, expression, target.index)[0])
        except BaseException:
            # The first failure is the answer (Triton's, when both are down); the BM25 call still ends before
            # the search does, so no call outlives its caller's use of the client (the page's lease).
            if lexical_search is not None:
                wait([lexical_search])
            raise
        if mode == "lexical":
            lexical = store.lexical_search(self.client, [text], depth, collection, expression)[0]
        else:
            lexical = [] if lexical_search is None else lexical_search.result()[0]  # within its own deadline
        hits = combine(mode, dense, lexical, target.index[1], target.fusion_rule)
        done = time.perf_counter()
        return SearchResult(text or "<image>", hits[:k], (embedded - started) * 1e3, (done - embedded) * 1e3,
                            mode, facet_counts(hits[:FACET_DEPTH]), notice, collection,
                            target.model)


def build_filter(args: argparse.Namespace) -> str:
    return filter_expression({name: getattr(args, name, None) for name in FILTERS}, args.filter)


def format_table(result: SearchResult) -> str:
    lines = [f'results for "{result.query}"  ({result.mode}; embed {result.embed_ms:.1f} ms, '
             f'search {result.search_ms:.1f} ms)']
    header = f"{'#':>2}  {'score':>6}  {'id':<8}  {'title':<48}  {'type':<14}  {'colour':<10}  {'gender':<7}  price"
    lines += [header, "-" * len(header)]
    for rank, hit in enumerate(result.hits, 1):
        f = hit.fields
        price = f"{f['price']:.2f}" if f.get("price", -1) >= 0 else "-"
        lines.append(f"{rank:>2}  {hit.score:6.3f}  {hit.product_id:<8.8}  {f.get('title', ''):<48.48}  "
                     f"{f.get('article_type', ''):<14.14}  {f.get('base_colour', ''):<10.10}  "
                     f"{f.get('gender', ''):<7.7}  {price}")
    if not result.hits:
        lines.append("(no product matches)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/search.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("query", nargs="?", help="what to look for, in words")
    p.add_argument("--image", type=Path, help="search with a photo instead (JPEG/PNG/WebP)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="number of results")
    p.add_argument("--filter", help="raw Milvus filter expression, e.g. 'price < 50'")
    p.add_argument("--category", help="master category, e.g. Apparel")
    p.add_argument("--article-type", dest="article_type", help="article type, e.g. Kurtas")
    p.add_argument("--colour", help="base colour, e.g. Red")
    p.add_argument("--gender", help="Men, Women, Boys, Girls or Unisex")
    p.add_argument("--usage", help="Casual, Formal, Sports, Ethnic...")
    p.add_argument("--min-price", type=float, help="lowest price (products without a price are stored as -1)")
    p.add_argument("--max-price", type=float, help="highest price")
    p.add_argument("--mode", choices=MODES, default="hybrid",
                   help="hybrid: BM25 and dense fused (exact codes and names, and meaning); dense: embeddings "
                        "only; lexical: BM25 only. A photo is always searched dense")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    if args.image is None and (args.query is None or not args.query.strip()):
        print("error: empty query: give some words to search for, or --image PATH", file=sys.stderr)
        return 2
    if args.top_k < 1:
        print("error: -k must be at least 1", file=sys.stderr)
        return 2
    try:
        image = args.image.read_bytes() if args.image else None
        encoder = TritonEncoder(args.triton_url, args.protocol, args.timeout)
        client = connect(args)
        searcher = Searcher(encoder, client, args.collection)
        result = searcher.search(args.query, image, args.top_k, build_filter(args), args.mode)
    except FileNotFoundError as exc:
        print(f"error: no such image file: {exc.filename}", file=sys.stderr)
        return 2
    except (EncoderUnavailable, EncodingError, store.StoreError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except store.errors() as exc:  # a deadline, an unreachable server, a filter Milvus refused
        print(f"error: {store.failure(exc, args.milvus_uri, args.timeout)}", file=sys.stderr)
        return 2
    if result.notice:
        print(f"note: {result.notice}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": result.query, "mode": result.mode, "embed_ms": result.embed_ms,
                          "search_ms": result.search_ms, "hits": [asdict(h) for h in result.hits],
                          "facets": result.facets}, indent=2))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
