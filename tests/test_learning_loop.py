"""The learning loop (client/learning_loop.py) at small scale on a real deployment: Triton in explicit model
control and the shared Milvus server, the real page, SIMULATED shoppers. A candidate trained on shuffled
judgments goes through every step (collect, judge, train, export, offline, interleave) and is refused; a
query-side promotion through the gate then switches the query model with shoppers searching (0 failed, 0
mixed queries, no re-index) and rolls back; a query model set of another product space is refused."""

from __future__ import annotations

import json
import time

import pytest

from client import serving, store
from client.encoder import TritonEncoder
from client.fusion_fit import rules
from client.learning_loop import CANDIDATE_SUFFIX
from client.learning_loop import main as loop_main
from client.search import RESOLVE_EVERY_S, Searcher
from client.upgrade import main as upgrade_main
from core.catalog import read_catalog
from core.fusion_rule import FusionRule, ranking_model
from tests.conftest import CATALOG, shared_deployment, titles_query_set
from tests.test_upgrade import Shoppers

pytestmark = pytest.mark.server
N = 300
ADMIN_KEY = "loop-test-key"
TAG = "q1"


@pytest.fixture(scope="module")
def deployment(tiny_repository, tmp_path_factory):
    """make serve's shape: Triton (explicit model control, admin key) on a copy of the tiny repository, a Milvus
    server, the first N catalog products indexed behind the serving name by upgrade.py; and a titles query set
    (the committed-set role of the offline gate)."""
    base = tmp_path_factory.mktemp("loop")
    with shared_deployment(tiny_repository, base, ADMIN_KEY) as (triton, milvus, repo):
        titles = titles_query_set(base / "titles.jsonl", N)
        assert upgrade_main(["--tag", "", "--catalog", str(CATALOG), "--limit", str(N), "--queries", str(titles),
                             "--mode", "dense", "--triton-url", triton.grpc_url, "--milvus-uri", milvus.uri,
                             "--admin-key", ADMIN_KEY]) == 0
        yield triton, milvus, base, repo


@pytest.fixture(scope="module")
def refused_loop(deployment):
    """The whole loop with a harmful candidate (trained on shuffled judgments)."""
    triton, milvus, base, repo = deployment
    code = loop_main(["--workdir", str(base / "work"), "--tag", TAG, "--milvus-uri", milvus.uri, "--triton-url",
                      triton.grpc_url, "--admin-key", ADMIN_KEY, "--model-repository", str(repo), "--catalog",
                      str(CATALOG), "--limit", str(N), "--sessions", "300", "--concurrency", "4", "--steps", "40",
                      "--shuffle-judgments", "--held-out-queries", "40", "--queries", str(base / "titles.jsonl"),
                      "--mode", "dense", "--interleave-share", "1.0", "--impressions", "120", "--parity-rows", "8",
                      "--cache-dir", str(base / "cache")])
    return code, json.loads((base / "work" / "report.json").read_text())


def test_the_loop_runs_every_step_and_its_gate_refuses_a_candidate_trained_on_shuffled_clicks(deployment,
                                                                                             refused_loop):
    triton, milvus, base, repo = deployment
    code, report = refused_loop
    assert code == 1 and not report["promoted"], report["why"]
    assert report["shuffled_judgments"] and report["training"]["shuffled"]
    # Every step left its evidence: judgments from the randomized searches, held-out numbers of both, an
    # interleaving report at the planned horizon on the (serving, candidate) pair, the committed set offline.
    assert report["click_model"]["explored_searches"] > 0 and report["click_model"]["judged_pairs"] > 0
    assert set(report["held_out"]) >= {"current", "candidate", "queries"} and report["held_out"]["simulated"]
    inter = report["interleaving"]
    assert inter["interleaved_searches"] >= 120 and inter["verdict"]["impressions"] == 120
    # B: what ranked the candidate's searches, its weights and its fitted fusion rule (a refit is another B).
    assert inter["model_b"].startswith(report["fingerprint"]) and inter["model_b"] != inter["model_a"]
    assert report["candidate_metrics"]["text"]["queries"] == report["current_metrics"]["text"]["queries"] == 60
    assert report["query_tag"] == TAG and report["candidate"] == report["current"]  # the collection stays
    # The fusion rule was fitted on the judged queries and travels with the model set: Triton's config gives it back.
    fit = report["fusion"]
    assert fit["queries"] > 0 and fit["rules"] == len(rules()) and fit["allowed"] >= 1
    encoder = TritonEncoder(triton.grpc_url, "grpc", 10.0, tag=TAG)
    assert encoder.fusion_rule == FusionRule.from_dict(fit["chosen"])
    assert inter["model_b"] == encoder.ranking_model == ranking_model(report["fingerprint"], encoder.fusion_rule)
    encoder.close()

    client = store.connect(milvus.uri)
    record = serving.collection_record(client, "products")
    assert record.query_tag is None and record.collection == report["current"]  # nothing switched
    staged = serving.collection_record(client, "products" + CANDIDATE_SUFFIX)
    assert (staged.collection, staged.query_tag) == (record.collection, TAG)
    # A rerun resumes: every step is found done, the same verdict comes back.
    assert loop_main(["--workdir", str(base / "work"), "--milvus-uri", milvus.uri, "--triton-url", triton.grpc_url,
                      "--admin-key", ADMIN_KEY, "--model-repository", str(repo), "--catalog", str(CATALOG),
                      "--limit", str(N), "--sessions", "300", "--impressions", "120", "--queries",
                      str(base / "titles.jsonl"), "--mode", "dense"]) == 1
    again = json.loads((base / "work" / "report.json").read_text())
    assert again["interleaving"] == report["interleaving"] and again["held_out"] == report["held_out"]
    client.close()


def _interleaving_won_by_the_candidate(triton, milvus, base, searches: int):
    """The real page interleaving the serving name with the candidate name; every shopper clicks the
    candidate's first product: the verdict must prefer it."""
    from fastapi.testclient import TestClient

    from client.app import Backend, CatalogImages, create_app
    from client.events import EventStore

    events = EventStore(base / "won.db")
    backend = Backend(triton.grpc_url, "grpc", milvus.uri, "products", 5.0, (None, None, None))
    api = TestClient(create_app(backend, CatalogImages(str(CATALOG), None), events=events,
                                candidate="products" + CANDIDATE_SUFFIX, interleave_share=1.0, seed=0))
    df, _ = read_catalog(CATALOG, limit=N)
    for title in list(df.title)[:searches]:
        body = api.get("/api/search", params={"q": title, "k": 10}).json()
        (query,) = [q for q in events.queries() if q.query_id == body["query_id"]]
        position = query.attributes["interleave"]["teams"].index("B") + 1
        assert api.post("/api/events", json={"action_name": "click", "query_id": body["query_id"],
                                             "position": position,
                                             "object_id": body["hits"][position - 1]["product_id"]}).status_code == 200
    return events.path


def test_a_query_side_promotion_reuses_the_collection_and_fails_and_mixes_no_query(deployment, refused_loop):
    triton, milvus, base, repo = deployment
    won = _interleaving_won_by_the_candidate(triton, milvus, base, 30)
    client = store.connect(milvus.uri)
    before = serving.collection_record(client, "products")
    collections, rows = sorted(client.list_collections()), store.count(client, before.collection)
    encoders = {tag: TritonEncoder(triton.grpc_url, "grpc", tag=tag) for tag in ("", TAG)}
    base_model, candidate_model = (encoders[""].ranking_model, encoders[TAG].ranking_model)
    assert encoders[TAG].product_space == encoders[""].fingerprint == base_model == before.fingerprint
    assert candidate_model.startswith(encoders[TAG].fingerprint) and candidate_model != base_model

    gate = ["--query-side", TAG, "--catalog", str(CATALOG), "--limit", str(N), "--queries", str(base / "titles.jsonl"),
            "--mode", "dense", "--triton-url", triton.grpc_url, "--milvus-uri", milvus.uri, "--admin-key", ADMIN_KEY,
            "--tolerance", "1.0"]
    evidence = ["--events", str(won), "--impressions", "30", "--json", str(base / "promoted.json")]
    df, _ = read_catalog(CATALOG, limit=N)
    shoppers = Shoppers(triton, milvus, list(zip(df.product_id.astype(str), df.title)))
    try:
        shoppers.wait_for(time.monotonic())
        # Without the interleaving evidence the gate refuses, whatever offline says.
        assert upgrade_main(gate) == 1
        assert upgrade_main([*gate, *evidence]) == 0
        switched = time.monotonic()
        shoppers.wait_for(switched + RESOLVE_EVERY_S)
        rolling = time.monotonic()
        assert upgrade_main(["--rollback", "--milvus-uri", milvus.uri]) == 0
        rolled = time.monotonic()
        shoppers.wait_for(rolled + RESOLVE_EVERY_S)
    finally:
        shoppers.close()
    report = json.loads((base / "promoted.json").read_text())
    assert report["promoted"] and report["interleaving"]["verdict"]["winner"] == "B", report["why"]

    assert not shoppers.errors, shoppers.errors[:3]  # zero failed queries
    queries = shoppers.queries
    assert {q.collection for q in queries} == {before.collection}  # one collection all along
    assert {q.model for q in queries} == {base_model, candidate_model}  # only these two: nothing mixed
    for start, end, expected in ((switched + RESOLVE_EVERY_S, rolling, candidate_model),
                                 (rolled + RESOLVE_EVERY_S, float("inf"), base_model)):
        window = {q.model for q in queries if start < q.started and q.finished < end}
        assert window == {expected}, (expected, window)
    # Nothing was re-indexed: the same collections, the same rows.
    assert sorted(client.list_collections()) == collections
    assert store.count(client, before.collection) == rows
    assert serving.collection_record(client, "products").query_tag is None  # rolled back
    client.close()


def test_a_query_model_of_another_product_space_is_refused_by_the_gate_and_by_searchers(deployment, refused_loop):
    """The candidate re-exported as another variant: its queries match fp32 product vectors, the collection
    holds the repository's own variant's. Neither the gate nor a searcher pairs them."""
    from client.upgrade import load_model_set
    from export.__main__ import main as export_main

    triton, milvus, base, repo = deployment
    export_main(["--checkpoint", str(base / "work" / "checkpoint"), "--out", str(repo), "--tag", "other", "--variant",
                 "fp32", "--measure", "fp32", "--graphs-dir", str(base / "graphs"), "--catalog", str(CATALOG),
                 "--parity-rows", "8"])
    load_model_set(triton.grpc_url, "grpc", "other", ADMIN_KEY, 60.0)
    assert upgrade_main(["--query-side", "other", "--catalog", str(CATALOG), "--limit", str(N), "--triton-url",
                         triton.grpc_url, "--milvus-uri", milvus.uri, "--admin-key", ADMIN_KEY, "--force"]) == 2
    client = store.connect(milvus.uri)
    record = serving.collection_record(client, "products")
    serving.switch(client, "mismatched", record.collection, query_tag="other")
    with pytest.raises(store.StoreError, match="product space"):
        Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "mismatched")
    client.close()
