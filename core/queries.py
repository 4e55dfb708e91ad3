"""Search queries made from product attributes, since no query log exists.

Every query carries the attribute constraints it names ("women's red kurtas" names gender, colour
and article type). Relevance is then defined, not guessed: a product is relevant to a query when
it matches every constraint. Training uses it to drop in-batch false negatives; validation uses it
to count every matching product as a hit.

TRAIN_TEMPLATES are the phrasings the training generator uses. Evaluation sets must be written in
other phrasings (see training/make_eval_set.py), so that a score measures generalisation, not memorised templates.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GENDER_WORDS = {
    "men": "Men", "men's": "Men", "women": "Women", "women's": "Women", "unisex": "Unisex",
    "boys": "Boys", "boy's": "Boys", "girls": "Girls", "girl's": "Girls", "kids": "",
}
GENDER_ADJ = {"Men": "men's", "Women": "women's", "Boys": "boys'", "Girls": "girls'", "Unisex": "unisex"}
GENDER_NOUN = {"Men": "men", "Women": "women", "Boys": "boys", "Girls": "girls", "Unisex": "everyone"}

# {placeholder} -> the attribute it names. "title" is a span of the product's own title.
PLACEHOLDERS = {"colour": "base_colour", "type": "article_type", "gender_adj": "gender",
                "gender_noun": "gender", "brand": "brand", "usage": "usage", "title": "title",
                "full_title": "title"}

TRAIN_TEMPLATES = (
    "{colour} {type}",
    "{gender_adj} {colour} {type}",
    "{brand} {type}",
    "{brand} {gender_adj} {type}",
    "{colour} {usage} {type}",
    "{type} for {gender_noun}",
    "{brand} {colour} {type}",
    "{title}",
    "{full_title}",  # people paste product names too
)

# Phrasings the training generator never produces: the committed evaluation set uses only these.
EVAL_TEMPLATES = (
    "{type} in {colour} for {gender_noun}",
    "{colour} coloured {type}",
    "{type} from {brand}",
    "{usage} {type} in {colour}",
    "looking for {brand} {colour} {type}",
    "{type} {brand} {colour}",
)

# The balanced sets' text queries (training/make_balanced_sets.py): the evaluation phrasings that name a look
# (type and colour) and no brand, so the query is about the look.
LOOK_TEMPLATES = tuple(t for t in EVAL_TEMPLATES if "{type}" in t and "{colour}" in t and "{brand}" not in t)


def brand_of(title: str) -> str:
    """The words before the gender word ("Puma Men's Shoes" -> "Puma"), else the first word."""
    words = title.split()
    for i, word in enumerate(words):
        if word.lower() in GENDER_WORDS and i > 0:
            return " ".join(words[:i])
    return words[0] if words else ""


def type_phrase(article_type: str, rng: random.Random) -> str:
    """"Casual Shoes" -> "casual shoes" or, sometimes, the singular "casual shoe"."""
    phrase = article_type.lower()
    if rng.random() < 0.4 and phrase.endswith("s") and not phrase.endswith("ss"):
        phrase = phrase[:-1]
    return phrase


@dataclass(frozen=True)
class Query:
    text: str
    product_id: str  # the product it was written from (always relevant)
    constraints: tuple[tuple[str, str], ...]  # (attribute, value); "title" means a title substring

    def matches(self, product: Mapping[str, str]) -> bool:
        for attr, value in self.constraints:
            if attr == "title":
                if f" {value} " not in f" {' '.join(words(product.get('title', '')))} ":
                    return False
            elif product.get(attr, "").lower() != value:
                return False
        return True


def product_attributes(row: Mapping) -> dict[str, str]:
    """The attributes a query can name, lowercase-comparable, from a catalog row."""
    attrs = {k: str(row.get(k) or "") for k in ("base_colour", "article_type", "gender", "usage")}
    attrs["title"] = str(row.get("title") or "")
    attrs["brand"] = brand_of(attrs["title"])
    return attrs


def look(attrs: Mapping[str, str]) -> tuple[str, str]:
    """What a photo shows that a shopper searches by: (article type, colour), lowercase.

    Image queries count the products with the same look as relevant (the committed eval set's
    definition); training treats in-batch products with the same look as positives of a photo.
    """
    return attrs.get("article_type", "").lower(), attrs.get("base_colour", "").lower()


def words(text: str) -> list[str]:
    """Lowercase words, the unit title constraints are matched on."""
    return re.findall(r"[\w'&-]+", text.lower())


def _title_span(title: str, rng: random.Random) -> str:
    w = words(title)
    if len(w) <= 2:
        return " ".join(w)
    n = rng.randint(2, min(4, len(w)))
    start = rng.randint(0, len(w) - n)
    return " ".join(w[start:start + n])


def render(template: str, attrs: Mapping[str, str], product_id: str, rng: random.Random) -> Query | None:
    """Fill a template from a product's attributes, or None when an attribute it needs is empty."""
    values, constraints = {}, []
    for name in re.findall(r"{(\w+)}", template):
        attr = PLACEHOLDERS[name]
        raw = attrs.get(attr, "")
        if not raw:
            return None
        if name == "type":
            values[name] = type_phrase(raw, rng)
        elif name == "gender_adj":
            values[name] = GENDER_ADJ.get(raw)
        elif name == "gender_noun":
            values[name] = GENDER_NOUN.get(raw)
        elif name == "title":
            values[name] = _title_span(raw, rng)
        elif name == "full_title":
            values[name] = " ".join(words(raw))
        else:
            values[name] = raw.lower()
        if not values[name]:
            return None
        constraints.append((attr, values[name] if attr == "title" else raw.lower()))
    text = " ".join(template.format(**values).split())
    return Query(text=text, product_id=product_id, constraints=tuple(sorted(set(constraints))))


def generate_query(attrs: Mapping[str, str], product_id: str, rng: random.Random,
                   templates: Sequence[str] = TRAIN_TEMPLATES) -> Query:
    """One query for one product; falls back to a title span when attributes are missing."""
    order = list(templates)
    rng.shuffle(order)
    for template in [*order, "{title}"]:
        query = render(template, attrs, product_id, rng)
        if query is not None:
            return query
    return Query(text=attrs.get("title", "").lower(), product_id=product_id, constraints=())


def generate_queries(rows: Sequence[Mapping], seed: int, per_product: int = 1,
                     templates: Sequence[str] = TRAIN_TEMPLATES) -> list[Query]:
    """Deterministic queries for a list of catalog rows, deduplicated by text."""
    rng = random.Random(seed)
    seen, out = set(), []
    for row in rows:
        attrs = product_attributes(row)
        for _ in range(per_product):
            query = generate_query(attrs, str(row["product_id"]), rng, templates)
            if query.text and query.text not in seen:
                seen.add(query.text)
                out.append(query)
    return out


def relevant_ids(query: Query, products: Sequence[Mapping[str, str]], ids: Sequence[str]) -> list[str]:
    """Ids of the products (given as attribute dicts) that match every constraint of the query."""
    found = [pid for pid, attrs in zip(ids, products) if query.matches(attrs)]
    if query.product_id not in found:
        found.append(query.product_id)
    return found


# Committed beside training/ (written by `python -m training.make_eval_set`), kept out of training.
EVAL_SETS_DIR = Path(__file__).resolve().parents[1] / "training" / "eval_sets"
DEFAULT_EVAL_SET = EVAL_SETS_DIR / "fashion.jsonl"
# Shoppers typing what dense vectors miss (`python -m training.make_lexical_sets`): model codes, rare names.
CODES_EVAL_SET = EVAL_SETS_DIR / "fashion-codes.jsonl"
NAMES_EVAL_SET = EVAL_SETS_DIR / "fashion-names.jsonl"
# One photo and one text query per look, looks drawn uniformly (`python -m training.make_balanced_sets`): the tail.
BALANCED_EVAL_SET = EVAL_SETS_DIR / "fashion-balanced.jsonl"
EVAL_SETS = (DEFAULT_EVAL_SET, CODES_EVAL_SET, NAMES_EVAL_SET, BALANCED_EVAL_SET)


def evaluation_query_products(paths: Sequence[str | Path] = EVAL_SETS) -> set[str]:
    """The products evaluation sets ask with: a photo query's product, and the product a text query was drawn
    from where its line records it ("source_product_id"). Calibration keeps clear of them; a missing file
    (another catalog's project) holds none."""
    found: set[str] = set()
    for path in paths:
        if not Path(path).is_file():
            continue
        for line in Path(path).read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                found.update(str(item[k]) for k in ("image_product_id", "source_product_id") if k in item)
    return found


def query_set_text(lines: Sequence[Mapping]) -> str:
    """A query set's JSONL text, one line per query (what QuerySet.load reads)."""
    return "".join(json.dumps(line) + "\n" for line in lines)


def write_query_set(path: str | Path, lines: Sequence[Mapping]) -> Path:
    """Write a query set (its folder made if missing); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(query_set_text(lines))
    return path


def look_group(item: Mapping) -> str | None:
    """The (article type, colour) combination a query line is about: its "group", or its constraints' type and
    colour when it names both; None otherwise. Macro averages and the balanced sets count by it."""
    if item.get("group"):
        return str(item["group"])
    constraints = item.get("constraints") or {}
    if constraints.get("article_type") and constraints.get("base_colour"):
        return f"{constraints['article_type']} / {constraints['base_colour']}".lower()
    return None


@dataclass
class QuerySet:
    """A JSONL query set: {"query": ..., "relevant": [ids]} or {"image_product_id": ..., "relevant": [ids]}, each
    optionally with "constraints" (the attributes it names) or a "group" (the look it is about: look_group)."""

    texts: list[str]
    text_relevant: list[list[str]]
    image_ids: list[str]
    image_relevant: list[list[str]]
    text_groups: list[str | None] = field(default_factory=list)
    image_groups: list[str | None] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> QuerySet:
        qs = cls([], [], [], [])
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            item = json.loads(line)
            relevant = [str(r) for r in item.get("relevant", [])]
            if not relevant:
                raise ValueError(f"{path}:{lineno}: a query needs at least one relevant id")
            if "query" in item:
                qs.texts.append(item["query"])
                qs.text_relevant.append(relevant)
                qs.text_groups.append(look_group(item))
            elif "image_product_id" in item:
                qs.image_ids.append(str(item["image_product_id"]))
                qs.image_relevant.append(relevant)
                qs.image_groups.append(look_group(item))
            else:
                raise ValueError(f"{path}:{lineno}: expected a 'query' or an 'image_product_id'")
        return qs
