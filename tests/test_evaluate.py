import json

from core.queries import EVAL_TEMPLATES, TRAIN_TEMPLATES
from training.evaluate import QuerySet, degrade_colour, evaluate, main

EVAL_SET = "training/eval_sets/fashion.jsonl"


def test_committed_eval_set_uses_only_unseen_phrasings():
    assert not set(EVAL_TEMPLATES) & set(TRAIN_TEMPLATES)
    queries = QuerySet.load(EVAL_SET)
    assert len(queries.texts) == 500 and len(queries.image_ids) == 200
    assert all(len(r) >= 1 for r in queries.text_relevant)


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


def test_image_queries_leave_their_own_product_out():
    from core.metrics import retrieval_metrics, without_query_products

    ranked = [["q1", "a", "x", "b"], ["x", "q2", "y"]]
    relevant = [["q1", "a", "b"], ["q2"]]
    kept_ranked, kept_relevant = without_query_products(ranked, relevant, ["q1", "q2"], k=3)
    assert kept_ranked == [["a", "x", "b"]] and kept_relevant == [["a", "b"]]  # q2 had only itself
    assert retrieval_metrics(kept_ranked, kept_relevant)["recall@1"] == 1.0
