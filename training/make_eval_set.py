"""Write the evaluation query set: held-out products, phrasings training never generates.

    python -m training.make_eval_set --out training/eval_sets/fashion.jsonl

Text queries come from products of the validation split (which training never sees, for the
default --val-fraction and --seed) in EVAL_TEMPLATES phrasings; a product is relevant when it
has every attribute the query names, anywhere in the catalog. Image queries are the photos of
held-out products; relevant are the products of the same article type and colour.
"""

from __future__ import annotations

import argparse
import random

from core.catalog import DEFAULT_CATALOG, read_catalog
from core.queries import (
    DEFAULT_EVAL_SET,
    EVAL_TEMPLATES,
    generate_query,
    product_attributes,
    relevant_ids,
    write_query_set,
)

from .data import split_indices


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.make_eval_set", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to draw products and relevance from")
    p.add_argument("--out", default=str(DEFAULT_EVAL_SET), help="JSONL file to write")
    p.add_argument("--text-queries", type=int, default=500, help="number of text queries")
    p.add_argument("--image-queries", type=int, default=200, help="number of image queries")
    p.add_argument("--val-fraction", type=float, default=0.05, help="the held-out share used by training")
    p.add_argument("--seed", type=int, default=0, help="the training split seed; also seeds sampling here")
    args = p.parse_args(argv)

    df, _ = read_catalog(args.catalog)
    rows = df.to_dict("records")
    attrs = [product_attributes(r) for r in rows]
    ids = [r["product_id"] for r in rows]
    _, held_out = split_indices(ids, args.val_fraction, args.seed)
    rng = random.Random(args.seed + 7)
    order = list(held_out)
    rng.shuffle(order)
    lines, seen = [], set()
    for i in order:
        if len(seen) == args.text_queries:
            break
        query = generate_query(attrs[i], ids[i], rng, EVAL_TEMPLATES)
        if query.text in seen or not query.constraints or any(a == "title" for a, _ in query.constraints):
            continue
        seen.add(query.text)
        lines.append({"query": query.text, "relevant": relevant_ids(query, attrs, ids),
                      "constraints": dict(query.constraints)})
    by_type_colour: dict[tuple[str, str], list[str]] = {}
    for pid, a in zip(ids, attrs):
        by_type_colour.setdefault((a["article_type"], a["base_colour"]), []).append(pid)
    for i in order[: args.image_queries]:
        key = (attrs[i]["article_type"], attrs[i]["base_colour"])
        lines.append({"image_product_id": ids[i], "relevant": by_type_colour[key],
                      "constraints": {"article_type": key[0], "base_colour": key[1]}})
    out = write_query_set(args.out, lines)
    print(f"wrote {out}: {len(seen)} text queries, {min(args.image_queries, len(order))} image queries")


if __name__ == "__main__":
    main()
