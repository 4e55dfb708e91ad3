"""Index real products through a real Triton server into a real Milvus Lite, then search."""

import json

import pytest

from client import store
from client.encoder import TritonEncoder
from client.filters import filter_expression
from client.index import Indexer
from client.search import Searcher, build_filter, parse_args
from client.search import main as search_main
from core.catalog import read_catalog
from tests.conftest import N_INDEXED as N

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def searcher(triton, milvus, indexed):
    return Searcher(TritonEncoder(triton.grpc_url, "grpc"), milvus, "products")


@pytest.fixture(scope="module")
def products(catalog_path):
    df, _ = read_catalog(catalog_path, limit=N)
    return df


def test_index_reports_and_counts_every_product(indexed, milvus):
    assert indexed.indexed == N and not indexed.failed and indexed.skipped == 0
    assert store.count(milvus, "products") == N
    index = milvus.describe_index("products", store.VECTOR)
    assert index["metric_type"] == store.METRIC  # the metric search.py uses


def test_reindexing_resumes_and_never_duplicates(triton, milvus, indexed, catalog_path):
    indexer = Indexer(triton.grpc_url, "grpc", milvus, "products")
    again = indexer.run(str(catalog_path), limit=N)
    assert again.skipped == N and again.indexed == 0
    forced = indexer.run(str(catalog_path), limit=20, reindex=True)
    assert forced.indexed == 20
    assert store.count(milvus, "products") == N


def test_exact_title_finds_its_product_in_the_top_3(searcher, products):
    # The tiny test model trains for a minute (0.85 here); the default model is near 1.0.
    found = sum(pid in [h.product_id for h in searcher.search(title, k=3).hits]
                for pid, title in zip(products.product_id, products.title))
    assert found / len(products) >= 0.75, f"{found}/{len(products)} exact titles in the top 3"


def test_a_product_photo_finds_that_product_first(searcher, products):
    for i in range(5):
        hits = searcher.search(image=bytes(products.image[i]), k=3).hits
        assert hits[0].product_id == products.product_id[i]


def test_filters_are_honoured(searcher):
    args = parse_args(["shoes", "--gender", "Women", "--max-price", "60"])
    hits = searcher.search("shoes", k=10, expression=build_filter(args)).hits
    assert hits and all(h.fields["gender"] == "Women" and h.fields["price"] <= 60 for h in hits)
    raw = parse_args(["watch", "--filter", 'usage == "Formal"'])
    assert all(h.fields["usage"] == "Formal" for h in searcher.search("watch", expression=build_filter(raw)).hits)


def test_filter_values_cannot_inject_expression_syntax(searcher):
    injection = 'Red" or price > 0 or base_colour == "'
    expression = filter_expression({"colour": injection})
    assert expression == 'base_colour == "Red\\" or price > 0 or base_colour == \\""'
    # Sent to Milvus, it is one odd colour that no product has, not a clause that matches every product.
    assert searcher.search("shirt", k=10, expression=expression).hits == []
    red = searcher.search("shirt", k=10, expression=filter_expression({"colour": "Red"})).hits
    assert red and all(h.fields["base_colour"] == "Red" for h in red)


def test_search_cli_prints_a_table_and_json(triton, milvus_path, indexed, products, capsys):
    common = ["--milvus-uri", milvus_path, "--triton-url", triton.grpc_url, "-k", "3"]
    assert search_main([products.title[0], *common]) == 0
    table = capsys.readouterr().out
    assert "score" in table and products.product_id[0] in table
    assert search_main([products.title[0], "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and {"product_id", "score", "fields"} <= set(result["hits"][0])


def test_collection_errors_are_clear(triton, tmp_path):
    client = store.connect(str(tmp_path / "empty.db"))
    encoder = TritonEncoder(triton.grpc_url, "grpc")
    with pytest.raises(store.StoreError, match="index a catalog first"):
        Searcher(encoder, client, "products")
    store.ensure_collection(client, encoder.embed_dim + 2, "products")
    with pytest.raises(store.StoreError, match="Re-index"):
        Searcher(encoder, client, "products")


def test_empty_query_is_refused_by_the_cli(capsys):
    assert search_main(["   "]) == 2
    assert "empty query" in capsys.readouterr().err


def test_indexing_with_triton_down_stops_with_a_clear_message(tmp_path, catalog_path, capsys):
    from client.index import main as index_main
    from core.server_process import free_port

    code = index_main(["--catalog", str(catalog_path), "--limit", "10", "--milvus-uri", str(tmp_path / "x.db"),
                       "--triton-url", f"127.0.0.1:{free_port()}", "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Triton did not answer (connection refused or lost)" in err
    assert "run the same command again" in err


def _failed_requests(triton, model: str) -> int:
    import tritonclient.http as http

    stats = http.InferenceServerClient(triton.http_url).get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_stats"]["fail"]["count"])


def test_products_with_broken_or_missing_images_are_indexed_text_only(triton, tmp_path, sample_csv):
    import pandas as pd

    src = pd.read_csv(sample_csv, dtype=str).iloc[:6]
    good = (sample_csv.parent / src.image_url[0]).read_bytes()
    (tmp_path / "good.jpg").write_bytes(good)
    (tmp_path / "truncated.jpg").write_bytes(good[:300])
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    src["image_url"] = ["good.jpg", "truncated.jpg", "text.jpg", "missing.jpg", "", "good.jpg"]
    src.to_csv(tmp_path / "catalog.csv", index=False)
    client = store.connect(str(tmp_path / "broken.db"))
    failures_before = _failed_requests(triton, "product_encoder")
    report = Indexer(triton.grpc_url, "grpc", client, "products", batch_size=6).run(str(tmp_path / "catalog.csv"))
    assert report.indexed == 6 and not report.failed
    # The photos were decoded before sending: Triton never saw a request fail (the failures that made Triton
    # 2.51 corrupt later requests, bench/triton_strings.py).
    assert _failed_requests(triton, "product_encoder") == failures_before
    assert sorted(pid for pid, _ in report.text_only) == sorted(src.product_id[1:5])
    assert store.count(client, "products") == 6


def test_the_collection_records_its_metric_and_search_uses_it(triton, tmp_path, catalog_path):
    client = store.connect(str(tmp_path / "l2.db"))
    Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=40, metric="L2")
    assert store.collection_metric(client, "products") == "L2"
    searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "products")
    assert searcher.metric == "L2" and searcher.search("shirt", k=5).hits


def test_served_evaluation_agrees_with_the_in_process_one(triton, milvus, milvus_path, indexed, products,
                                                          tiny_checkpoint, catalog_path, tmp_path, capsys):
    from client.evaluate import evaluate_served
    from client.evaluate import main as evaluate_main
    from training.evaluate import QuerySet, evaluate

    ids, titles = products["product_id"].astype(str).tolist(), products["title"].tolist()
    lines = [{"query": t, "relevant": [i]} for i, t in zip(ids[:60], titles[:60])]
    looks = list(zip(products["article_type"], products["base_colour"]))
    same_look = {i: [j for j, lj in zip(ids, looks) if lj == li] for i, li in zip(ids, looks)}
    photos = [i for i in ids[100:160] if len(same_look[i]) > 1][:20]  # relevant: the *other* products of its look
    lines += [{"image_product_id": i, "relevant": same_look[i]} for i in photos]
    lines.append({"query": "a product that was never indexed", "relevant": ["no-such-id"]})  # dropped, as in-process
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(x) + "\n" for x in lines))

    served = evaluate_served(TritonEncoder(triton.grpc_url, "grpc"), milvus, queries, str(catalog_path),
                             collection="products", mode="dense")  # the in-process evaluation is dense
    local = evaluate(tiny_checkpoint, QuerySet.load(queries), str(catalog_path), corpus_limit=N,
                     cache_dir=str(tmp_path))
    assert served["products"] == N
    for kind in ("text", "image"):
        a, b = served["metrics"][kind], local["metrics"][kind]
        assert a["queries"] == b["queries"] == (60 if kind == "text" else 20)
        for metric in ("recall@10", "recall@100", "mrr@10", "ndcg@10"):
            assert abs(a[metric] - b[metric]) <= 0.05, (kind, metric, a[metric], b[metric])
    assert served["metrics"]["text"]["recall@10"] >= 0.75  # exact titles, tiny model
    assert served["metrics"]["image"]["ndcg@10"] > 0.3  # 0.5-0.6 here; the own product does not count

    code = evaluate_main(["--queries", str(queries), "--catalog", str(catalog_path), "--triton-url", triton.grpc_url,
                          "--milvus-uri", milvus_path, "--collection", "products", "--mode", "dense",
                          "--json", str(tmp_path / "served.json")])
    assert code == 0 and "| served (300 products, dense) | text |" in capsys.readouterr().out
    assert json.loads((tmp_path / "served.json").read_text())["metrics"]["text"]["queries"] == 60


def test_recreate_rebuilds_a_lite_collection(triton, tmp_path, catalog_path):
    # A plain Lite collection (no route): --recreate drops and rebuilds it.
    from client.index import main as index_main

    args = ["--catalog", str(catalog_path), "--limit", "12", "--milvus-uri", str(tmp_path / "r.db"),
            "--triton-url", triton.grpc_url, "--protocol", "grpc"]
    assert index_main(args) == 0
    assert index_main([*args[:3], "8", *args[4:], "--recreate"]) == 0  # fewer products: a rebuild, not a sync
    client = store.connect(str(tmp_path / "r.db"))
    assert store.count(client, "products") == 8
    client.close()
