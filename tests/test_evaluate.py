import itertools
import json
import re
from pathlib import Path

import pytest

from core.queries import DEFAULT_EVAL_SET, EVAL_TEMPLATES, GENDER_ADJ, GENDER_NOUN, TRAIN_TEMPLATES
from training.evaluate import QuerySet, degrade_colour, evaluate, main

EVAL_SET = str(DEFAULT_EVAL_SET)


def _phrasings(templates, constraints: dict) -> set[str]:
    """Every text the templates make from these attribute values (singular and plural types)."""
    kind = constraints.get("article_type", "")
    gender = constraints.get("gender", "").capitalize()
    values = {"colour": [constraints.get("base_colour")], "brand": [constraints.get("brand")],
              "usage": [constraints.get("usage")], "type": [kind, kind[:-1] if kind.endswith("s") else kind],
              "gender_adj": [GENDER_ADJ.get(gender)], "gender_noun": [GENDER_NOUN.get(gender)]}
    out = set()
    for template in templates:
        names = re.findall(r"{(\w+)}", template)
        if all(values.get(n) and all(values[n]) for n in names):
            for combo in itertools.product(*(values[n] for n in names)):
                out.add(" ".join(template.format(**dict(zip(names, combo))).split()))
    return out


@pytest.mark.unit
def test_committed_eval_set_uses_only_unseen_phrasings():
    """Every committed text query is an EVAL_TEMPLATES phrasing of its attributes and none that the
    training generator makes from the same attributes (its title templates aside: the eval set names
    no title span)."""
    lines = [json.loads(x) for x in Path(EVAL_SET).read_text().splitlines() if x.strip()]
    texts = [x for x in lines if "query" in x]
    assert len(texts) == 500 and sum("image_product_id" in x for x in lines) == 200
    attribute_templates = [t for t in TRAIN_TEMPLATES if "title" not in t]
    for item in texts:
        assert item["relevant"] and "title" not in item["constraints"], item
        assert item["query"] in _phrasings(EVAL_TEMPLATES, item["constraints"]), item
        assert item["query"] not in _phrasings(attribute_templates, item["constraints"]), item


def test_evaluate_reports_text_and_image_metrics(tiny_checkpoint, catalog_path, tmp_path, capsys):
    from core.catalog import read_catalog

    df, _ = read_catalog(catalog_path, limit=200)
    looks = dict(zip(df["product_id"], zip(df["article_type"], df["base_colour"])))
    same_look = [pid for pid, look in looks.items() if look == looks["1163"]]  # blue t-shirts
    assert len(same_look) > 5
    qs = tmp_path / "q.jsonl"
    lines = [{"query": "black tshirts for men", "relevant": ["1163"]},
             {"image_product_id": "1163", "relevant": same_look},
             {"image_product_id": "1164", "relevant": ["1164"]}]  # only its own product: nothing left to find
    qs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = evaluate(tiny_checkpoint, QuerySet.load(qs), str(catalog_path), corpus_limit=200,
                      cache_dir=str(tmp_path))
    text, image = result["metrics"]["text"], result["metrics"]["image"]
    assert {"recall@10", "recall@100", "ndcg@10", "mrr@10", "queries"} <= set(text)
    assert text["queries"] == 1 and image["queries"] == 1  # the own product is out of ranking and relevance
    main(["--checkpoint", str(tiny_checkpoint), "--queries", str(qs), "--catalog", str(catalog_path),
          "--corpus-limit", "200", "--cache-dir", str(tmp_path), "--json", str(tmp_path / "m.json")])
    assert "| tiny | text |" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["text"]["queries"] == 1


@pytest.mark.unit
def test_colour_degradation_removes_colour_words_only(catalog_path):
    from core.catalog import read_catalog
    from training.data import build_product_set

    df, report = read_catalog(catalog_path, limit=50)
    products = build_product_set(df, None, report)
    degraded = degrade_colour(products)
    for before, after, attrs in zip(products.texts, degraded.texts, products.attrs):
        colour = attrs["base_colour"].lower()
        assert colour not in after.lower().split() or " " in colour
        assert len(after) <= len(before)


@pytest.mark.unit
def test_image_queries_leave_their_own_product_out():
    from core.metrics import retrieval_metrics, without_query_products

    ranked = [["q1", "a", "x", "b"], ["x", "q2", "y"]]
    relevant = [["q1", "a", "b"], ["q2"]]
    kept_ranked, kept_relevant = without_query_products(ranked, relevant, ["q1", "q2"], k=3)
    assert kept_ranked == [["a", "x", "b"]] and kept_relevant == [["a", "b"]]  # q2 had only itself
    assert retrieval_metrics(kept_ranked, kept_relevant)["recall@1"] == 1.0
