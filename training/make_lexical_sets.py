"""Write the exact-match query sets: model codes and rare product names, as shoppers type them.

    python -m training.make_lexical_sets --out-dir training/eval_sets

Dense vectors generalise over wording and miss what is rare; these sets measure exactly that, in
phrasings the training generator never produces (it makes attribute phrases, title spans of 2-4
words and whole titles):
  fashion-codes.jsonl  a model code from a title ("pl13090js-28e", "puma 65cc", "model f300")
  fashion-names.jsonl  a brand and a rare word of its title ("nike sahara", "sahara by nike")
Relevant = every product whose title holds the code (resp. the brand and the word), anywhere in
the catalog. Same JSONL format as the attribute set (core.queries.QuerySet).
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from pathlib import Path

from core.catalog import DEFAULT_CATALOG, read_catalog
from core.queries import CODES_EVAL_SET, EVAL_SETS_DIR, GENDER_WORDS, NAMES_EVAL_SET, brand_of, words, write_query_set

# A model code: letters and digits together, two digits at least ("F300" yes, "Tee2" no).
CODE = re.compile(r"^(?=(?:.*\d){2})(?=.*[a-z])[a-z0-9][a-z0-9\-/.]{2,}[a-z0-9]$")
CODE_PHRASINGS = ("{code}", "{brand} {code}", "model {code}", "{code} {type}")
NAME_PHRASINGS = ("{brand} {name}", "{name} by {brand}", "{name} {brand}")


def code_queries(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    holders: dict[str, list[str]] = {}
    for r in rows:
        for token in {w for w in r["title"].lower().split() if CODE.match(w)}:
            holders.setdefault(token, []).append(r["product_id"])
    by_code = {r["product_id"]: r for r in rows}
    codes = sorted(holders)
    rng.shuffle(codes)
    out = []
    for code in codes[:n]:
        product = by_code[holders[code][0]]
        text = rng.choice(CODE_PHRASINGS).format(code=code, brand=brand_of(product["title"]).lower(),
                                                 type=product["article_type"].lower())
        out.append({"query": " ".join(text.split()), "relevant": holders[code], "kind": "code"})
    return out


def name_queries(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Brand + a word that at most 3 titles hold and that no attribute value names."""
    frequency = Counter(w for r in rows for w in set(words(r["title"])))
    common = {w for r in rows for key in ("article_type", "base_colour", "usage", "sub_category")
              for w in words(r.get(key) or "")} | set(GENDER_WORDS)
    candidates = []
    for r in rows:
        brand = brand_of(r["title"]).lower()
        brand_words = set(words(brand))
        rare = [w for w in words(r["title"]) if w.isalpha() and len(w) >= 5 and frequency[w] <= 3
                and w not in common and w not in brand_words]
        if brand_words and rare:
            candidates.append((" ".join(words(brand)), rng.choice(rare), r["product_id"]))
    rng.shuffle(candidates)
    out, seen = [], set()
    for brand, name, source in candidates:
        if (brand, name) in seen:
            continue
        seen.add((brand, name))
        relevant = [r["product_id"] for r in rows
                    if name in words(r["title"]) and f" {brand} " in f" {' '.join(words(r['title']))} "]
        if source not in relevant:  # a brand that words() splits differently: not a clean query
            continue
        text = rng.choice(NAME_PHRASINGS).format(brand=brand, name=name)
        out.append({"query": text, "relevant": relevant, "kind": "name"})
        if len(out) == n:
            break
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.make_lexical_sets", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog to draw products and relevance from")
    p.add_argument("--out-dir", default=str(EVAL_SETS_DIR), help="folder for fashion-codes/-names.jsonl")
    p.add_argument("--queries", type=int, default=150, help="queries per set")
    p.add_argument("--seed", type=int, default=11, help="sampling seed")
    args = p.parse_args(argv)
    df, _ = read_catalog(args.catalog)
    rows = df.to_dict("records")
    rng = random.Random(args.seed)
    for name, items in ((CODES_EVAL_SET.name, code_queries(rows, args.queries, rng)),
                        (NAMES_EVAL_SET.name, name_queries(rows, args.queries, rng))):
        path = write_query_set(Path(args.out_dir) / name, items)
        print(f"wrote {path}: {len(items)} queries")


if __name__ == "__main__":
    main()
