"""Write the balanced evaluation set: one photo and one text query per look, looks drawn uniformly.

    python -m training.make_balanced_sets --out training/eval_sets/fashion-balanced.jsonl

A look is an (article type, base colour) combination with at least --min-products catalog products. The
committed set (training/make_eval_set.py) samples products, so popular looks fill it; here up to --looks
looks are drawn uniformly at random (a fixed seed) among those with a product in the held-out split, which
training never sees (for the default --val-fraction and --seed). For each look, one of its held-out
products, drawn at random, gives:
- a photo query, its photo; relevant: every catalog product of the look (an image query's own product
  is left out when it is scored);
- a text query about the look, in the committed set's phrasings that name the type and the colour and no
  brand (core.queries.LOOK_TEMPLATES); relevant: the products with every attribute it names.
Every line records its look ("group", what macro averages count by), the number of catalog products of
the look, and its source product, so that calibration can keep clear of every evaluation product.
Only looks with a held-out product can be drawn, and a look with more products has one more often: the
draw leans a little towards bigger looks, and still holds looks of every size (the by-size table).
"""

from __future__ import annotations

import argparse
import random

from core.catalog import DEFAULT_CATALOG, read_catalog
from core.queries import (
    BALANCED_EVAL_SET,
    LOOK_TEMPLATES,
    generate_query,
    look,
    product_attributes,
    relevant_ids,
    write_query_set,
)

from .data import split_indices

MIN_PRODUCTS = 3


def balanced_lines(rows: list[dict], looks: int, min_products: int, val_fraction: float, seed: int) -> list[dict]:
    """The set's JSONL lines: per drawn look, a photo query then a text query."""
    attrs = [product_attributes(r) for r in rows]
    ids = [str(r["product_id"]) for r in rows]
    _, held_out = split_indices(ids, val_fraction, seed)
    members: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(attrs):
        key = look(a)
        if all(key):
            members.setdefault(key, []).append(i)
    held: dict[tuple[str, str], list[int]] = {}
    for i in sorted(held_out):
        key = look(attrs[i])
        if key in members:
            held.setdefault(key, []).append(i)
    eligible = sorted(key for key, found in held.items() if len(members[key]) >= min_products)
    rng = random.Random(seed + 11)
    lines = []
    for key in rng.sample(eligible, min(looks, len(eligible))):
        source = rng.choice(held[key])
        group, size = " / ".join(key), len(members[key])
        lines.append({"image_product_id": ids[source], "relevant": [ids[i] for i in members[key]],
                      "constraints": {"article_type": key[0], "base_colour": key[1]}, "group": group,
                      "look_products": size})
        query = generate_query(attrs[source], ids[source], rng, LOOK_TEMPLATES)
        lines.append({"query": query.text, "relevant": relevant_ids(query, attrs, ids),
                      "constraints": dict(query.constraints), "group": group, "look_products": size,
                      "source_product_id": ids[source]})
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.make_balanced_sets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to draw looks, products and relevance from")
    p.add_argument("--out", default=str(BALANCED_EVAL_SET), help="JSONL file to write")
    p.add_argument("--looks", type=int, default=300, help="looks to draw (one photo and one text query each)")
    p.add_argument("--min-products", type=int, default=MIN_PRODUCTS, help="fewest catalog products a look needs")
    p.add_argument("--val-fraction", type=float, default=0.05, help="the held-out share used by training")
    p.add_argument("--seed", type=int, default=0, help="the training split seed; also seeds the draw")
    args = p.parse_args(argv)
    df, _ = read_catalog(args.catalog)
    lines = balanced_lines(df.to_dict("records"), args.looks, args.min_products, args.val_fraction, args.seed)
    out = write_query_set(args.out, lines)
    print(f"wrote {out}: {len(lines) // 2} looks, one photo and one text query each")


if __name__ == "__main__":
    main()
