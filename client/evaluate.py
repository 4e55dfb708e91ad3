"""Retrieval quality of the served system: queries embedded by Triton, searched in Milvus.

    python client/evaluate.py --queries training/eval_sets/fashion.jsonl --json runs/served_eval.json

Same query set format and metrics as `python -m training.evaluate` (which runs the PyTorch towers
in-process); the two agree up to what the served graph variant (e.g. INT8) and the Milvus index
change. Relevant products that are not in the collection are dropped, as the in-process
evaluation drops those outside its corpus. An image query's own product is left out of its ranking
and its relevant set, as in training.evaluate.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python client/evaluate.py` from a checkout
    sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from client import serving, store  # noqa: E402
from client.capabilities import lexical_missing  # noqa: E402
from client.connection import add_connection_args, connect  # noqa: E402
from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder  # noqa: E402
from client.fusion import MODES, combine  # noqa: E402
from core.catalog import DEFAULT_CATALOG, CatalogError, ColumnMap, ImageFetcher, read_catalog  # noqa: E402
from core.metrics import (  # noqa: E402
    KS,
    finds_others,
    format_groups,
    format_table,
    grouped_metrics,
    retrieval_metrics,
    without_query_products,
)
from core.queries import DEFAULT_EVAL_SET, QuerySet  # noqa: E402
from core.specs import QUERY_ENCODER  # noqa: E402

logger = logging.getLogger("client.evaluate")


def _ranked(client, collection: str, vectors, k: int, index: tuple[str, str]) -> list[list[str]]:
    return [[hit.product_id for hit in hits] for hits in store.search(client, vectors, k, collection, index=index)]


def evaluate_served(encoder: TritonEncoder, client, queries: Path, catalog: str | None,
                    columns: ColumnMap | None = None, collection: str = store.COLLECTION,
                    batch_size: int = 32, mode: str = "hybrid", image_encoder: TritonEncoder | None = None) -> dict:
    """Metrics per query kind of `collection` searched as served: text queries embedded by `encoder` (the
    collection's model, or a query model set trained into its product space), photos by `image_encoder`
    (default `encoder`; a query-side set's photos are the collection's own model's)."""
    qs = QuerySet.load(queries)
    store.check_model(client, collection, encoder.product_space)
    image_encoder = image_encoder or encoder
    store.check_model(client, collection, image_encoder.fingerprint)
    index = store.collection_index(client, collection)
    client.load_collection(collection)
    k = max(KS)
    wanted = {r for rel in qs.text_relevant + qs.image_relevant for r in rel}
    indexed = store.existing_ids(client, sorted(wanted), collection)
    if mode != "dense" and not store.has_lexical(client, collection):
        logger.warning("text queries evaluated dense, not %s: %s", mode, lexical_missing(client, collection))
        mode = "dense"
    out = {"collection": collection, "products": store.count(client, collection), "mode": mode, "metrics": {},
           "groups": {}}

    def ranked_texts(texts: list[str]) -> list[list[str]]:
        dense = ([[]] * len(texts) if mode == "lexical" else
                 store.search(client, encoder.embed_queries(texts), k, collection, index=index))
        lexical = [[]] * len(texts) if mode == "dense" else store.lexical_search(client, texts, k, collection)
        rule = encoder.fusion_rule
        return [[h.product_id for h in combine(mode, d, lx, index[1], rule)[:k]] for d, lx in zip(dense, lexical)]

    def keep(queries_, relevant_lists, groups):
        kept = [(q, [r for r in rel if r in indexed], g) for q, rel, g in zip(queries_, relevant_lists, groups)]
        return [(q, rel, g) for q, rel, g in kept if rel]

    text_items = keep(qs.texts, qs.text_relevant, qs.text_groups)
    if text_items:
        ranked = []
        for start in tqdm(range(0, len(text_items), batch_size), desc="text queries", unit="batch", disable=None):
            ranked += ranked_texts([q for q, _, _ in text_items[start:start + batch_size]])
        relevant = [rel for _, rel, _ in text_items]
        out["metrics"]["text"] = retrieval_metrics(ranked, relevant, KS)
        out["groups"]["text"] = grouped_metrics(ranked, relevant, [g for _, _, g in text_items])
    # Dropped here, not by without_query_products below, so the groups stay parallel to what is scored.
    image_items = [(q, rel, g) for q, rel, g in keep(qs.image_ids, qs.image_relevant, qs.image_groups)
                   if finds_others(q, rel)]
    if image_items and image_encoder.multimodal:
        if catalog is None:
            raise ValueError("image queries need --catalog (the query is a catalog product's photo)")
        df, _ = read_catalog(catalog, columns)
        refs = dict(zip(df["product_id"].astype(str), df["image"]))
        fetch = ImageFetcher(base_dir=df.attrs.get("base_dir"))
        ranked, relevant, photo_ids, groups = [], [], [], []
        for start in tqdm(range(0, len(image_items), batch_size), desc="image queries", unit="batch", disable=None):
            batch = []
            for product_id, rel, group in image_items[start:start + batch_size]:
                try:
                    batch.append((fetch(refs[product_id]), rel, product_id, group))
                except Exception as exc:  # noqa: BLE001  (a query whose photo is unreadable is skipped, and said)
                    logger.warning("image query %s skipped: %s", product_id, exc)
            if batch:
                # One more than k: the photo's own product is dropped from its ranking below.
                ranked += _ranked(client, collection, image_encoder.embed_images([b[0] for b in batch]), k + 1, index)
                relevant += [b[1] for b in batch]
                photo_ids += [b[2] for b in batch]
                groups += [b[3] for b in batch]
        ranked, relevant = without_query_products(ranked, relevant, photo_ids, k)
        if ranked:
            out["metrics"]["image"] = retrieval_metrics(ranked, relevant, KS)
            out["groups"]["image"] = grouped_metrics(ranked, relevant, groups)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--queries", type=Path, default=DEFAULT_EVAL_SET,
                   help="JSONL query set (training.evaluate's format)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog the image queries' photos come from")
    p.add_argument("--batch-size", type=int, default=32, help="queries per Triton request and Milvus search")
    p.add_argument("--mode", choices=MODES, default="hybrid",
                   help="how text queries search (image queries are always dense), as client/search.py --mode")
    p.add_argument("--json", dest="json_out", type=Path, help="also write the metrics to this JSON file")
    ColumnMap.add_arguments(p)
    add_connection_args(p, batch=True)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        client = connect(args)
        record = serving.collection_record(client, args.collection)  # the collection the name serves now
        encoder = TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=record.query_model_set)
        encoder.check_ready([QUERY_ENCODER])
        images = (TritonEncoder(args.triton_url, args.protocol, args.batch_timeout, tag=record.tag)
                  if record.query_tag is not None else None)
        result = evaluate_served(encoder, client, args.queries, args.catalog, ColumnMap.from_args(args),
                                 record.collection, args.batch_size, args.mode, image_encoder=images)
    except (EncoderUnavailable, EncodingError, store.StoreError, CatalogError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except store.errors() as exc:
        print(f"error: {store.failure(exc, args.milvus_uri)}", file=sys.stderr)
        return 2
    name = f"served ({result['products']} products, {result['mode']})"
    print(format_table({name: result}))
    print()
    print(format_groups({name: result}))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
