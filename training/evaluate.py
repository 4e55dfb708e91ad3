"""Retrieval quality of a checkpoint on a query set, with the PyTorch towers.

    python -m training.evaluate --checkpoint runs/mm3-concat --queries evaluation/fashion_queries.jsonl

A query set is JSONL: {"query": "...", "relevant": [ids]} for text queries, or
{"image_product_id": "...", "relevant": [ids]} for image queries (the photo of that catalog
product is the query; that product itself is left out of the ranking and of the relevant set,
so a photo scores by the *other* products it finds). Reports Recall@{1,10,100} (capped, see
core.metrics), nDCG@10, MRR@10 and the query count, per query kind, as a table and as JSON.

`--degrade colour` removes colour words from every product's text before embedding it: what a
model still finds then comes from the image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np

from core.catalog import DEFAULT_CATALOG, ColumnMap, read_catalog
from core.metrics import (
    KS,
    finds_others,
    format_groups,
    format_table,
    grouped_metrics,
    rank,
    retrieval_metrics,
    without_query_products,
)
from core.queries import QuerySet

from .data import ProductSet, build_product_set
from .encode import embed_image_queries, embed_products, embed_queries, resolve_device
from .factory import create_model, create_tokenizer, load_checkpoint_config

logger = logging.getLogger("training.evaluate")


def degrade_colour(products: ProductSet) -> ProductSet:
    """Product texts without their colour words (every base_colour value of the catalog)."""
    colours = sorted({a["base_colour"].lower() for a in products.attrs if a["base_colour"]}, key=len, reverse=True)
    if not colours:
        return products
    pattern = re.compile(r"\b(" + "|".join(re.escape(c) for c in colours) + r")\b", re.IGNORECASE)
    texts = [" ".join(pattern.sub(" ", t).split()) for t in products.texts]
    return ProductSet(products.ids, texts, products.attrs, products.pixels, products.has_image)


def product_embeddings(checkpoint: Path, model, tokenizer, products: ProductSet, image_cfg: dict | None,
                       catalog_path: str, degrade: str | None = None, cache_dir: str = "cache") -> np.ndarray:
    """Every product's embedding by the checkpoint's product tower, cached by checkpoint (path and weights
    time), catalog and degradation."""
    key = hashlib.sha1(json.dumps([str(checkpoint.resolve()), (checkpoint / "model.safetensors").stat().st_mtime_ns,
                                   catalog_path, len(products.ids), degrade]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"product-embeddings-{key}.npy"
    if cache.is_file():
        return np.load(cache)
    logger.info("embedding %d products", len(products.ids))
    product_emb = embed_products(model, tokenizer, products, image_cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, product_emb)
    return product_emb


def evaluate(checkpoint: str | Path, queries: QuerySet, catalog: str = DEFAULT_CATALOG,
             columns: ColumnMap | None = None, degrade: str | None = None, cache_dir: str = "cache",
             corpus_limit: int | None = None, device: str = "auto") -> dict:
    """Metrics per query kind, plus the rankings (for exclusive-match analyses)."""
    checkpoint = Path(checkpoint)
    model = create_model(checkpoint).eval().to(resolve_device(device))
    tokenizer = create_tokenizer(checkpoint)
    image_cfg = load_checkpoint_config(checkpoint)["preprocess_cfg"]["image"]
    df, report = read_catalog(catalog, columns, limit=corpus_limit)
    # Images are decoded at the tower's size; a text-only model still needs them for image queries.
    products = build_product_set(df, image_cfg, report, cache_dir)
    if degrade == "colour":
        products = degrade_colour(products)
    elif degrade:
        raise ValueError(f"unknown degradation {degrade!r}: expected 'colour'")
    ids = products.ids
    product_emb = product_embeddings(checkpoint, model, tokenizer, products, image_cfg, df.attrs["path"], degrade,
                                     cache_dir)
    corpus = set(ids)
    out = {"checkpoint": str(checkpoint), "degrade": degrade, "products": len(ids), "metrics": {}, "groups": {},
           "rankings": {}}

    def keep(relevant_lists):
        return [[r for r in rel if r in corpus] for rel in relevant_lists]

    if queries.texts:
        relevant = keep(queries.text_relevant)
        mask = [bool(r) for r in relevant]
        texts = [t for t, m in zip(queries.texts, mask) if m]
        groups = [g for g, m in zip(queries.text_groups, mask) if m]
        relevant = [r for r in relevant if r]
        ranked = rank(embed_queries(model, tokenizer, texts), product_emb, ids, k=max(KS))
        out["metrics"]["text"] = retrieval_metrics(ranked, relevant, KS)
        out["groups"]["text"] = grouped_metrics(ranked, relevant, groups)
        out["rankings"]["text"] = {"queries": texts, "ranked": ranked, "relevant": relevant}
    if queries.image_ids and model.cfg.multimodal:
        position = {pid: i for i, pid in enumerate(ids)}
        # Dropped here, not by without_query_products below, so the groups stay parallel to what is scored.
        pairs = [(position[q], rel, g) for q, rel, g in zip(queries.image_ids, keep(queries.image_relevant),
                                                            queries.image_groups)
                 if q in position and finds_others(q, rel) and products.has_image[position[q]]]
        if pairs:
            idx = [i for i, _, _ in pairs]
            image_emb = embed_image_queries(model, products.pixels[idx], image_cfg)
            ranked, relevant = without_query_products(rank(image_emb, product_emb, ids, k=max(KS) + 1),
                                                      [r for _, r, _ in pairs], [ids[i] for i in idx], max(KS))
            out["metrics"]["image"] = retrieval_metrics(ranked, relevant, KS)
            out["groups"]["image"] = grouped_metrics(ranked, relevant, [g for _, _, g in pairs])
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("training").setLevel(logging.INFO)
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory")
    p.add_argument("--queries", required=True, help="JSONL query set (see the module docstring)")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog holding the searched products")
    p.add_argument("--corpus-limit", type=int, default=None, help="search only the first N catalog products")
    p.add_argument("--degrade", choices=["colour"], default=None, help="remove colour words from product texts")
    p.add_argument("--cache-dir", default="cache", help="where images and product embeddings are cached")
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", help="where the towers run: auto (a CUDA GPU if torch sees one), "
                   "cpu, cuda, cuda:N")
    ColumnMap.add_arguments(p)
    args = p.parse_args(argv)
    result = evaluate(args.checkpoint, QuerySet.load(args.queries), args.catalog, ColumnMap.from_args(args),
                      args.degrade, args.cache_dir, args.corpus_limit, args.device)
    print(format_table({Path(args.checkpoint).name: result}))
    print()
    print(format_groups({Path(args.checkpoint).name: result}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({k: v for k, v in result.items() if k != "rankings"}, indent=2))


if __name__ == "__main__":
    main()
