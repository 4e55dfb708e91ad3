"""Search the indexed catalog by text or by image, through Triton and Milvus.

    python client/search.py "red kurta for women"
    python client/search.py "running shoes" -k 5 --gender Men --max-price 40
    python client/search.py --image photo.jpg --json
    python client/search.py "watch" --filter 'price < 50 and usage == "Formal"'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python client/search.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client import store
from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder
from client.index import add_connection_args
from core.specs import IMAGE_ENCODER, QUERY_ENCODER

logger = logging.getLogger("client.search")

# Structured filters: flag -> (template, parameter). Values are quoted by store.render_filter.
FILTERS = {
    "category": ("master_category == {category}", str),
    "article_type": ("article_type == {article_type}", str),
    "colour": ("base_colour == {colour}", str),
    "gender": ("gender == {gender}", str),
    "usage": ("usage == {usage}", str),
    "min_price": ("price >= {min_price}", float),
    "max_price": ("price <= {max_price}", float),
}


@dataclass
class SearchResult:
    query: str
    hits: list[store.Hit]
    embed_ms: float
    search_ms: float


class Searcher:
    """Embeds through Triton, searches Milvus; refuses a collection of another dimension."""

    def __init__(self, encoder: TritonEncoder, client, collection: str = store.COLLECTION):
        self.encoder, self.client, self.collection = encoder, client, collection
        dim = store.collection_dim(client, collection)
        if dim is None:
            raise store.StoreError(f"no collection {collection!r}: index a catalog first "
                                   "(python client/index.py --catalog PATH)")
        if dim != encoder.embed_dim:
            raise store.StoreError(
                f"collection {collection!r} holds {dim}-d vectors but the served model makes {encoder.embed_dim}-d "
                "ones: it was indexed with another model. Re-index (python client/index.py --recreate).")
        # Loading the collection into memory is a one-off cost of a process (about a second at
        # 44k products with Milvus Lite); done here, it is not charged to the first search.
        self.index = store.collection_index(client, collection)  # (index type, metric)
        self.metric = self.index[1]
        started = time.perf_counter()
        client.load_collection(collection)
        self.load_ms = (time.perf_counter() - started) * 1e3

    def search(self, text: str | None = None, image: bytes | None = None, k: int = 10,
               expression: str = "") -> SearchResult:
        started = time.perf_counter()
        if image is not None:
            vector = self.encoder.embed_images([image])[0]
        elif text is not None:
            vector = self.encoder.embed_queries([text])[0]
        else:
            raise EncodingError("nothing to search: give a query text or an image")
        embedded = time.perf_counter()
        hits = store.search(self.client, [vector], k, self.collection, expression, self.index,
                            timeout_s=self.encoder.timeout_s)[0]
        done = time.perf_counter()
        return SearchResult(text or "<image>", hits, (embedded - started) * 1e3, (done - embedded) * 1e3)


def filter_expression(values: Mapping[str, object], raw: str | None = None) -> str:
    """A Milvus expression from FILTERS values (None = not set) and an optional raw expression.

    Raises ValueError when a value does not convert to its filter's type.
    """
    parts, params = [], {}
    for name, (template, kind) in FILTERS.items():
        value = values.get(name)
        if value is None:
            continue
        try:
            params[name] = kind(value)
        except ValueError:
            raise ValueError(f"{name} must be a {kind.__name__}, not {value!r}") from None
        parts.append(template)
    expression = store.render_filter(" and ".join(parts), params) if parts else ""
    if raw:  # a raw Milvus expression from the user, taken as written
        expression = f"({raw}) and ({expression})" if expression else raw
    return expression


def build_filter(args: argparse.Namespace) -> str:
    return filter_expression({name: getattr(args, name, None) for name in FILTERS}, args.filter)


def format_table(result: SearchResult) -> str:
    lines = [f'results for "{result.query}"  (embed {result.embed_ms:.1f} ms, search {result.search_ms:.1f} ms)']
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
        encoder = TritonEncoder(args.triton_url, args.protocol)
        encoder.check_ready([QUERY_ENCODER] + ([IMAGE_ENCODER] if image else []))
        client = store.connect(args.milvus_uri, args.token, args.user, args.password)
        searcher = Searcher(encoder, client, args.collection)
        result = searcher.search(args.query, image, args.top_k, build_filter(args))
    except FileNotFoundError as exc:
        print(f"error: no such image file: {exc.filename}", file=sys.stderr)
        return 2
    except (EncoderUnavailable, EncodingError, store.StoreError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"query": result.query, "embed_ms": result.embed_ms, "search_ms": result.search_ms,
                          "hits": [asdict(h) for h in result.hits]}, indent=2))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
