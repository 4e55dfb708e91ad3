"""Shoppers' events against the real page, Triton and Milvus: every search answers with its query_id and is logged
with what it served; events are checked against it; two page processes share one store; a kill -9 of the page
during a burst loses no acknowledged event."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from client.app import EXPLORE_DEPTH, Backend, CatalogImages, create_app
from client.events import EventStore
from client.index import Indexer
from client.milvus_server import MilvusServer
from client.page_process import PageServer
from core.catalog import read_catalog
from core.server_process import free_port
from tests.conftest import N_INDEXED, serving

pytestmark = pytest.mark.server
N_PAGE_PRODUCTS = 120  # indexed into the served Milvus the page processes share


@pytest.fixture(scope="module")
def backend(triton, milvus_path, indexed):
    return Backend(triton.grpc_url, "grpc", milvus_path, "products", 5.0, (None, None, None))


@pytest.fixture(scope="module")
def images(catalog_path):
    return CatalogImages(str(catalog_path), None)


@pytest.fixture
def logged_api(backend, images, tmp_path):
    from fastapi.testclient import TestClient

    store = EventStore(tmp_path / "events.db")
    return TestClient(create_app(backend, images, events=store)), store


def test_a_search_answers_with_its_query_id_and_logs_what_it_served(logged_api, catalog_path):
    api, store = logged_api
    body = api.get("/api/search", params={"q": "blue shirt", "k": 5, "gender": "Men", "client_id": "browser-1",
                                          "session_id": "visit-1"}).json()
    (query,) = store.queries()
    assert body["query_id"] == query.query_id
    assert query.hit_ids == [h["product_id"] for h in body["hits"]] and len(query.hit_ids) == 5
    assert (query.kind, query.user_query, query.client_id, query.session_id) == ("text", "blue shirt", "browser-1",
                                                                                 "visit-1")
    assert query.attributes["filter"] == 'gender == "Men"' and query.attributes["mode"] == "hybrid"
    assert re.fullmatch(r"[0-9a-f]{12}-\w+", query.model) and query.collection  # who served it
    products, _ = read_catalog(catalog_path, limit=5)
    photo = api.post("/api/search/image", files={"file": ("mine.jpg", bytes(products.image[2]), "image/jpeg")},
                     data={"k": "3"}).json()
    image_query = next(q for q in store.queries() if q.query_id == photo["query_id"])
    assert image_query.kind == "image" and re.fullmatch(r"mine\.jpg sha1:[0-9a-f]{16}", image_query.user_query)


def test_events_are_logged_once_checked_and_counted_by_position(logged_api):
    api, store = logged_api
    body = api.get("/api/search", params={"q": "black watch", "k": 6}).json()
    query_id, hits = body["query_id"], body["hits"]
    ok = api.post("/api/events", json=[
        {"action_name": "click", "query_id": query_id, "object_id": hits[2]["product_id"], "position": 3},
        {"action_name": "add_to_cart", "query_id": query_id, "session_id": "v",
         "event_attributes": {"object": {"object_id": hits[2]["product_id"]}, "position": {"ordinal": 3}}}])
    assert ok.status_code == 200 and ok.json() == {"logged": 2}
    refused = [
        ({"action_name": "click", "query_id": "no-such-query", "object_id": hits[0]["product_id"], "position": 1},
         422, "unknown query_id"),
        ({"action_name": "click", "query_id": query_id, "object_id": hits[0]["product_id"], "position": 2},
         422, "served 1"),
        ([{"action_name": "click", "query_id": query_id, "object_id": hits[0]["product_id"], "position": 1},
          {"action_name": "stare", "query_id": query_id, "object_id": hits[0]["product_id"], "position": 1}],
         422, "action_name"),
        ([], 422, "no events"),
    ]
    for payload, status, words in refused:
        response = api.post("/api/events", json=payload)
        assert response.status_code == status and words in response.json()["error"], (payload, response.text)
    garbled = api.post("/api/events", content=b"{not json", headers={"content-type": "application/json"})
    assert garbled.status_code == 400 and "JSON" in garbled.json()["error"]
    nested = api.post("/api/events", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert nested.status_code in (400, 413) and "error" in nested.json()
    huge = api.post("/api/events", content=b" " * (300 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert store.counts()["events"] == 2  # nothing of a refused request
    metrics = api.get("/metrics").text
    assert re.search(r'mmsearch_events_total\{action="click",model="[^"]+",position="3"\} 1\.0', metrics)
    assert re.search(r'mmsearch_impressions_total\{model="[^"]+",position="6"\} [1-9]', metrics)


def test_a_store_that_cannot_write_answers_503_and_the_search_still_answers(backend, images, tmp_path, monkeypatch):
    """Another worker holding the write lock past the store's deadline: events are refused with a 503 saying
    nothing was logged, searches still answer (query_id null, counted as an event_store error)."""
    import sqlite3

    from fastapi.testclient import TestClient

    import client.events as events

    monkeypatch.setattr(events, "BUSY_TIMEOUT_S", 0.2)
    store = EventStore(tmp_path / "events.db")
    api = TestClient(create_app(backend, images, events=store))
    body = api.get("/api/search", params={"q": "red shirt", "k": 3}).json()
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        click = {"action_name": "click", "query_id": body["query_id"], "object_id": body["hits"][0]["product_id"],
                 "position": 1}
        refused = api.post("/api/events", json=click)
        assert refused.status_code == 503 and "nothing of this request was logged" in refused.json()["error"]
        searched = api.get("/api/search", params={"q": "red shirt", "k": 3})
        assert searched.status_code == 200 and searched.json()["query_id"] is None and searched.json()["hits"]
        assert re.search(r'mmsearch_errors_total\{error_class="event_store"\} 2\.0', api.get("/metrics").text)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert api.post("/api/events", json=click).status_code == 200  # and it recovers by itself
    assert store.counts()["events"] == 1


def test_an_explored_search_shows_its_top_in_another_order_and_says_so(backend, images, tmp_path):
    from fastapi.testclient import TestClient

    store = EventStore(tmp_path / "events.db")
    plain = TestClient(create_app(backend, images)).get("/api/search", params={"q": "shirt", "k": 12}).json()
    explored = TestClient(create_app(backend, images, events=store, explore_share=1.0, seed=3))
    body = explored.get("/api/search", params={"q": "shirt", "k": 12}).json()
    ids = [[h["product_id"] for h in b["hits"]] for b in (plain, body)]
    assert plain["query_id"] is None  # no store: nothing logged, and the response says so
    assert ids[0][:EXPLORE_DEPTH] != ids[1][:EXPLORE_DEPTH] and sorted(ids[0][:EXPLORE_DEPTH]) == sorted(
        ids[1][:EXPLORE_DEPTH]) and ids[0][EXPLORE_DEPTH:] == ids[1][EXPLORE_DEPTH:]
    (query,) = store.queries()
    assert query.attributes["explore"] == f"shuffle-top-{EXPLORE_DEPTH}" and query.hit_ids == ids[1]


# -- page processes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_milvus(triton, catalog_path, tmp_path_factory):
    from client import store

    server = MilvusServer(tmp_path_factory.mktemp("events-milvus"), port=free_port()).start()
    client = store.connect(server.uri)
    Indexer(triton.grpc_url, "grpc", client, "products", batch_size=16).run(str(catalog_path), limit=N_PAGE_PRODUCTS)
    client.close()
    yield server
    server.stop()


def _page(triton, served_milvus, catalog_path, events, tmp_path, name: str) -> PageServer:
    return PageServer(triton.grpc_url, served_milvus.uri, str(catalog_path), port=free_port(),
                      log_file=tmp_path / f"{name}.log", events=str(events))


def _call(url: str, payload=None, timeout: float = 10.0) -> tuple[int, dict]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_two_page_processes_share_one_store_and_export_it(triton, served_milvus, catalog_path, tmp_path):
    from client.event_export import main as export_main

    events = tmp_path / "events.db"
    with (_page(triton, served_milvus, catalog_path, events, tmp_path, "a") as a,
          _page(triton, served_milvus, catalog_path, events, tmp_path, "b") as b):
        status, body = _call(f"{a.url}/api/search?q=red+tshirt&k=4")
        assert status == 200
        hit = body["hits"][1]
        click = {"action_name": "click", "query_id": body["query_id"], "object_id": hit["product_id"], "position": 2}
        assert _call(f"{b.url}/api/events", click) == (200, {"logged": 1})  # served by a, clicked through b
    export_main(["--events", str(events), "--out", str(tmp_path / "export")])
    (line,) = (tmp_path / "export" / "ubi_events.ndjson").read_text().splitlines()
    assert json.loads(line)["event_attributes"]["object"]["object_id"] == hit["product_id"]


def test_kill_9_of_the_page_during_a_burst_loses_no_acknowledged_event(triton, served_milvus, catalog_path, tmp_path):
    events = tmp_path / "events.db"
    page = _page(triton, served_milvus, catalog_path, events, tmp_path, "killed").start()
    try:
        served = []
        for q in ("shirt", "watch", "shoes", "bag"):
            status, body = _call(f"{page.url}/api/search?q={q}&k=10")
            assert status == 200
            served += [(body["query_id"], h["product_id"], i + 1) for i, h in enumerate(body["hits"])]
        acknowledged, failures, lock, kill_after = [], [], threading.Lock(), 60

        def shopper(worker: int) -> None:
            for n in range(1000):
                query_id, object_id, position = served[(worker * 7 + n) % len(served)]
                event = {"action_name": "click", "query_id": query_id, "object_id": object_id, "position": position,
                         "event_attributes": {"seq": f"{worker}-{n}"}}
                try:
                    status, body = _call(f"{page.url}/api/events", event, timeout=5)
                except OSError:  # the page is gone: what it acknowledged is what counts
                    return
                if status != 200:  # seen by the test's thread below, not lost as a thread's exception
                    failures.append((status, body))
                    return
                with lock:
                    acknowledged.append(f"{worker}-{n}")
                    if len(acknowledged) == kill_after:  # the hook: the kill lands while the others are in flight
                        page.kill()

        threads = [threading.Thread(target=shopper, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures and page.process.poll() is not None and len(acknowledged) >= kill_after
        page.start()  # the page comes back on the same store
        status, body = _call(f"{page.url}/api/search?q=shirt&k=3")
        assert status == 200 and body["query_id"]
    finally:
        page.stop()
    stored = {e[8]["seq"] for e in EventStore(events, read_only=True).events()}
    assert set(acknowledged) <= stored


def test_the_page_sends_its_shoppers_clicks_in_headless_chromium(logged_api):
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: run scripts/system-deps.sh (make test does)"
    api, store = logged_api
    with serving(api.app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#q", "blue jeans")
        page.click("button[type=submit]")
        page.wait_for_selector(".card")
        page.locator(".card").nth(2).click()
        page.locator(".card .cart").nth(2).click()
        deadline = time.monotonic() + 10
        while store.counts()["events"] < 2:
            assert time.monotonic() < deadline, "the page's events did not arrive in 10 s"
            time.sleep(0.1)
        browser.close()
    (query,) = store.queries()
    events = list(store.events())
    assert [(e[2], e[4], e[5]) for e in events] == [("click", query.hit_ids[2], 3),
                                                    ("add_to_cart", query.hit_ids[2], 3)]
    assert events[0][6] == query.client_id and query.client_id  # the browser's id, on the query and its events


def test_simulated_shoppers_drive_the_page_and_the_click_model_reads_their_logs(backend, images, catalog_path,
                                                                               tmp_path):
    from client.judgments import main as judgments_main
    from client.simulated_shoppers import SIMULATED, ShopperModel, Simulation, load_intents

    store = EventStore(tmp_path / "events.db")
    app = create_app(backend, images, events=store, explore_share=0.5, seed=0)
    intents, weights, median = load_intents(str(catalog_path), seed=0, limit=N_INDEXED)
    model = ShopperModel.make(median, seed=0)
    with serving(app) as url:
        tally = Simulation(url, intents, weights, model, seed=0).run(300, concurrency=4, progress=False)
    assert tally.sessions == 300 and not tally.failed and tally.clicks > 100
    queries = list(store.queries())
    assert len(queries) == tally.searches and all(q.client_id.startswith(SIMULATED) for q in queries)
    assert 0.3 < sum("explore" in q.attributes for q in queries) / len(queries) < 0.7
    events = list(store.events())
    assert sum(e[2] == "click" for e in events) == tally.clicks and all(e[8]["simulated"] for e in events)
    report = judgments_main(["--events", str(store.path), "--out", str(tmp_path / "judgments"),
                             "--client-prefix", SIMULATED])
    examination = report["examination"]
    assert examination[0] == 1.0 and report["clicks"] == tally.clicks
    # Far too few sessions for 10% (bench/shoppers.py), enough for the shape: the top is examined more.
    assert sum(examination[:3]) / 3 > 1.5 * sum(examination[7:]) / 3, examination
    judged = [json.loads(line) for line in (tmp_path / "judgments" / "judgments.jsonl").read_text().splitlines()]
    assert judged and all(0 <= j["rating"] <= 1 and j["impressions"] >= 3 for j in judged)


def test_interleaving_logs_each_products_team_and_the_verdict_credits_the_clicked_team(backend, images, tmp_path):
    """The candidate here is the serving collection itself (an A/A pair: the merged list is the page's own), and
    the shoppers click only team B's products: the verdict must name B."""
    from fastapi.testclient import TestClient

    from client.interleave import main as interleave_main

    store = EventStore(tmp_path / "events.db")
    api = TestClient(create_app(backend, images, events=store, candidate="products", interleave_share=1.0, seed=0))
    plain = TestClient(create_app(backend, images))
    queries = ["shirt", "watch", "blue jeans", "black shoes", "red kurta", "bag", "socks", "sunglasses"] * 3
    for q in queries:
        body = api.get("/api/search", params={"q": q, "k": 10}).json()
        assert [h["product_id"] for h in body["hits"]] == [
            h["product_id"] for h in plain.get("/api/search", params={"q": q, "k": 10}).json()["hits"]]
        (query,) = [x for x in store.queries() if x.query_id == body["query_id"]]
        teams = query.attributes["interleave"]["teams"]
        assert len(teams) == 10 and set(teams) == {"A", "B"} and "explore" not in query.attributes
        position = teams.index("B") + 1
        click = {"action_name": "click", "query_id": body["query_id"], "position": position,
                 "object_id": body["hits"][position - 1]["product_id"]}
        assert api.post("/api/events", json=click).status_code == 200
    (report,) = interleave_main(["--events", str(store.path), "--impressions", str(len(queries)), "--json"])
    v = report["verdict"]
    assert (v["winner"], v["wins_b"], v["wins_a"], v["impressions"]) == ("B", len(queries), 0, len(queries))
    assert report["model_a"] == report["model_b"] == query.model
    assert interleave_main(["--events", str(store.path), "--impressions", "1000"])[0]["verdict"] is None
    assert re.search(r'mmsearch_impressions_total\{model="interleaved",position="10"\} 24\.0', api.get("/metrics").text)


def test_a_failing_candidate_leaves_the_pages_results_and_is_counted(backend, images, tmp_path):
    from fastapi.testclient import TestClient

    store = EventStore(tmp_path / "events.db")
    api = TestClient(create_app(backend, images, events=store, candidate="no_such_collection", interleave_share=1.0))
    body = api.get("/api/search", params={"q": "shirt", "k": 5})
    assert body.status_code == 200 and len(body.json()["hits"]) == 5
    (query,) = store.queries()
    assert "interleave" not in query.attributes
    assert re.search(r'mmsearch_errors_total\{error_class="interleave"\} 1\.0', api.get("/metrics").text)


def test_the_simulated_relevance_of_the_served_model_beats_a_random_ranking(backend, images, catalog_path,
                                                                           tmp_path):
    import random

    from client.simulated_eval import Grader, evaluate, held_out_queries
    from client.simulated_shoppers import load_intents

    intents, weights, _ = load_intents(str(catalog_path), seed=0, limit=N_INDEXED)
    grader = Grader.from_catalog(str(catalog_path), N_INDEXED)
    products = grader.products
    queries = held_out_queries(intents, weights, 40, seed=0)
    store = EventStore(tmp_path / "events.db")
    with serving(create_app(backend, images, events=store)) as url:
        served = evaluate(url, queries, grader)
    assert served["failures"] == 0 and served["scored"] >= 30
    assert all(q.client_id == "simulated-evaluation" for q in store.queries())
    rng, ids, scores = random.Random(0), list(products), []
    for _, intent in queries:  # the baseline: 10 of the indexed products at random
        score = grader.ndcg(intent, rng.sample(ids, 10))
        if score is not None:
            scores.append(score)
    random_ndcg = sum(scores) / len(scores)
    assert served["ndcg"] > 3 * random_ndcg and served["ndcg"] > 0.3, (served["ndcg"], random_ndcg)
