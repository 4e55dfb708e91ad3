"""The search page and its JSON API, against the real Triton and Milvus Lite; end to end in headless Chromium."""

from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from pymilvus.exceptions import MilvusException

from client.app import ApiError, Backend, CatalogImages, create_app
from core.catalog import read_catalog
from core.server_process import free_port
from tests.conftest import N_INDEXED, serving

pytestmark = pytest.mark.server
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def products(catalog_path):
    df, _ = read_catalog(catalog_path, limit=N_INDEXED)
    return df


@pytest.fixture(scope="module")
def backend(triton, milvus_path, indexed):
    return Backend(triton.grpc_url, "grpc", milvus_path, "products", 5.0, (None, None, None))


@pytest.fixture(scope="module")
def app(backend, catalog_path):
    return create_app(backend, CatalogImages(str(catalog_path), None), max_upload_bytes=1024 * 1024)


@pytest.fixture(scope="module")
def api(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


def test_text_search_api_returns_cards_with_images(api, products):
    title = products.title[5]
    body = api.get("/api/search", params={"q": title, "k": 5}).json()
    assert body["query"] == title and len(body["hits"]) == 5
    assert str(products.product_id[5]) in [h["product_id"] for h in body["hits"][:3]]
    hit = body["hits"][0]
    assert {"title", "article_type", "base_colour", "gender", "price"} <= set(hit["fields"])
    image = api.get(hit["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert "max-age" in image.headers["cache-control"]
    again = api.get(hit["image_url"], headers={"If-None-Match": image.headers["etag"]})
    assert again.status_code == 304


def test_filters_and_image_search(api, products):
    body = api.get("/api/search", params={"q": "shirt", "gender": "Women", "max_price": 60, "k": 10}).json()
    assert body["hits"] and all(h["fields"]["gender"] == "Women" and h["fields"]["price"] <= 60
                                for h in body["hits"])
    photo = bytes(products.image[3])
    found = api.post("/api/search/image", files={"file": ("shirt.jpg", photo, "image/jpeg")}, data={"k": "3"}).json()
    assert found["hits"][0]["product_id"] == str(products.product_id[3])


def test_api_errors_are_clear_json(api, products):
    cases = [
        (api.get("/api/search", params={"q": "   "}), 400, "empty query"),
        (api.get("/api/search", params={"q": "shoes", "k": 0}), 422, None),
        (api.post("/api/search/image", files={"file": ("x.jpg", b"not an image", "image/jpeg")}), 400, "bad image"),
        (api.post("/api/search/image", files={"file": ("x.jpg", b"", "image/jpeg")}), 400, "empty upload"),
        (api.post("/api/search/image", files={"file": ("big.jpg", b"\xff" * (2 * 1024 * 1024), "image/jpeg")}),
         413, "too large"),
        (api.get("/images/no-such-product"), 404, "no image"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        if words:
            assert words in response.json()["error"]
    assert "/api/search" in api.get("/openapi.json").json()["paths"]
    assert api.get("/api/health").json() == {"triton": "ok", "milvus": "ok"}


def test_health_polls_share_the_search_connection(backend, api):
    assert api.get("/api/health").json() == {"triton": "ok", "milvus": "ok"}
    shared = backend._milvus
    for _ in range(3):  # the page polls every 15 s: no new Milvus client per poll
        assert api.get("/api/health").json() == {"triton": "ok", "milvus": "ok"}
    assert shared is not None and backend._milvus is shared and shared.users == 0
    assert api.get("/api/search", params={"q": "shirt", "k": 3}).json()["hits"]  # search unaffected
    assert backend._milvus is shared


def test_a_retired_milvus_client_is_closed_by_its_last_request_never_under_one(triton, milvus_path, indexed):
    """After a connection-level failure the shared client is replaced for new requests and Milvus is marked
    down: one request at a time probes it, the others are answered at once. Requests still using the old
    client finish on it (closing it under them was "Cannot invoke RPC on closed channel"); the last closes it."""
    from client.store import StoreError

    backend = Backend(triton.grpc_url, "grpc", milvus_path, "products", 5.0, (None, None, None))
    in_flight = backend._lease()  # a request still searching
    failing = backend._lease()  # another one, on the same client, fails at the connection level
    assert failing is in_flight
    backend._release(failing, False, "Milvus at x is unreachable")
    assert in_flight.retired and backend._milvus is None and backend._down == "Milvus at x is unreachable"
    assert backend._admit() is True  # the next request probes
    with pytest.raises(StoreError, match="Milvus at x is unreachable"):
        backend._admit()  # and while it does, the others get the last failure at once
    fresh = backend._lease()
    assert fresh is not in_flight and backend._milvus is fresh
    assert in_flight.client.has_collection("products")  # still open under its request
    backend._release(fresh, True, "")  # the probe reached Milvus: up again
    assert backend._down is None and backend._admit() is False
    backend._release(in_flight, False, None)  # its last request done: closed now, on a thread of its own
    for thread in threading.enumerate():
        if thread.name == "milvus-close":
            thread.join(30)
    with pytest.raises(MilvusException, match="should create connection first"):  # pymilvus: a closed client
        in_flight.client.has_collection("products")
    assert fresh.client.has_collection("products") and backend.search("shirt", None, 3, "").hits


def test_dependencies_down_answer_fast_with_a_status(milvus_path, catalog_path, tmp_path):
    from fastapi.testclient import TestClient

    backend = Backend(f"127.0.0.1:{free_port()}", "grpc", str(tmp_path / "empty.db"), "products", 2.0,
                      (None, None, None))
    client = TestClient(create_app(backend, CatalogImages(None, None)))
    started = time.monotonic()
    response = client.get("/api/search", params={"q": "red kurta"})
    assert response.status_code == 503 and response.json()["error"].startswith("Triton did not answer")
    health = client.get("/api/health")
    assert health.status_code == 503
    assert health.json()["triton"].startswith("unhealthy") and "no collection" in health.json()["milvus"]
    assert time.monotonic() - started < 15
    assert "<form" in client.get("/").text  # the page itself still loads


def test_hybrid_search_api_with_modes_facets_and_hostile_text(api):
    body = api.get("/api/search", params={"q": "blue shirt", "k": 5}).json()
    assert body["mode"] == "hybrid" and body["notice"] == "" and len(body["hits"]) == 5
    colours = body["facets"]["base_colour"]
    assert colours and all(c["count"] >= 1 for c in colours)
    value = colours[0]["value"]
    narrowed = api.get("/api/search", params={"q": "blue shirt", "colour": value, "mode": "lexical"}).json()
    assert narrowed["mode"] == "lexical" and {h["fields"]["base_colour"] for h in narrowed["hits"]} <= {value}
    assert api.get("/api/search", params={"q": "shirt", "mode": "fuzzy"}).status_code == 422
    for text in ['red" or 1==1', "shoes AND (nike OR puma) -adidas", "😀🔥", "!!!", "ñandú", "{0} %s"]:
        response = api.get("/api/search", params={"q": text, "k": 3})
        assert response.status_code == 200, (text, response.text)
    long = api.get("/api/search", params={"q": "x" * 10_000})
    assert long.status_code == 400 and "too long" in long.json()["error"]


def test_an_oversized_body_is_refused_before_it_is_read(api):
    def chunks():  # no Content-Length: the limit must hold as the bytes stream in
        for _ in range(64):
            yield b"\xff" * 65536

    response = api.post("/api/search/image", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "request too large" in response.json()["error"]


def test_concurrent_requests_each_get_their_own_triton_client(triton, milvus_path, indexed, catalog_path, products):
    """tritonclient's HTTP client is not thread-safe: one per request thread, all answers right."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    backend = Backend(triton.http_url, "http", milvus_path, "products", 5.0, (None, None, None))
    client = TestClient(create_app(backend, CatalogImages(None, None)))
    titles = list(zip(products.title[:40], products.product_id[:40].astype(str)))

    def ask(item):
        title, pid = item
        body = client.get("/api/search", params={"q": title, "k": 5}).json()
        return pid in [h["product_id"] for h in body["hits"]]

    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(ask, titles * 2))
    assert sum(found) >= 0.75 * len(found)


def test_a_refused_filter_is_the_callers_fault_and_keeps_the_connections(backend, api):
    api.get("/api/search", params={"q": "shirt", "k": 3})
    milvus = backend._milvus
    with pytest.raises(ApiError) as refused:
        backend.search("shirt", None, 3, "price >>> 3")  # search.py --filter passes user text through
    assert refused.value.status == 400 and "filter" in refused.value.message
    assert backend._milvus is milvus  # not reset: nothing was wrong with Milvus


def test_requests_during_an_outage_fail_side_by_side_not_in_a_queue(tmp_path, monkeypatch):
    """Triton accepts connections but never answers. Six requests at once must all be inside a Triton call at
    the same time, not queued behind a lock: each waits at a barrier of six as its call starts, which breaks
    (and fails the request with another message) if the requests were let through one at a time."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from client.encoder import TritonEncoder

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    barrier, real = threading.Barrier(6, timeout=20), TritonEncoder.check_ready

    def check_ready_together(self, *args, **kwargs):
        barrier.wait()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TritonEncoder, "check_ready", check_ready_together)
    try:
        backend = Backend(f"127.0.0.1:{silent.getsockname()[1]}", "grpc", str(tmp_path / "m.db"), "products", 1.0,
                          (None, None, None))
        client = TestClient(create_app(backend, CatalogImages(None, None), max_searches=6))
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.get("/api/search", params={"q": "shirt"}), range(6)))
        assert [a.status_code for a in answers] == [503] * 6, [a.text for a in answers]
        assert all(a.json()["error"].startswith("Triton did not answer (no answer within the deadline)")
                   for a in answers), answers[0].text
        assert not barrier.broken
    finally:
        silent.close()


def test_searches_past_the_slots_wait_in_line_and_an_outage_still_answers_within_two_deadlines(tmp_path):
    """Two search slots, six requests at once, Triton silent (1 s deadline): two hold the slots until their
    deadline, the others wait in line at most a deadline. Every request is answered 503, saying Triton did not
    answer or the page is overloaded, none after two deadlines (and a margin for this machine)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        backend = Backend(f"127.0.0.1:{silent.getsockname()[1]}", "grpc", str(tmp_path / "m.db"), "products", 1.0,
                          (None, None, None))
        client = TestClient(create_app(backend, CatalogImages(None, None), max_searches=2))

        def ask(_):
            started = time.monotonic()
            answer = client.get("/api/search", params={"q": "shirt"})
            return answer, time.monotonic() - started

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        assert [a.status_code for a, _ in answers] == [503] * 6, [a.text for a, _ in answers]
        errors = [a.json()["error"] for a, _ in answers]
        assert all(e.startswith(("Triton did not answer", "the page is overloaded")) for e in errors), errors
        assert sum(e.startswith("Triton") for e in errors) >= 2  # the slot holders reached Triton
        assert max(t for _, t in answers) < 3.5
        metrics = client.get("/metrics").text
        overloaded = _sample(metrics, 'mmsearch_errors_total{error_class="overload"}')
        assert overloaded == sum(e.startswith("the page is overloaded") for e in errors)
    finally:
        silent.close()


@pytest.fixture(scope="module")
def served_page(app):
    with serving(app) as url:
        yield url


def test_metrics_count_stages_errors_and_the_served_model(api):
    api.get("/api/search", params={"q": "blue shirt", "k": 3})
    api.get("/api/search", params={"q": "  "})  # bad input
    text = api.get("/metrics").text
    assert 'mmsearch_stage_seconds_count{kind="text",stage="embed"}' in text
    assert _sample(text, 'mmsearch_stage_seconds_count{kind="text",stage="total"}') >= 1
    assert _sample(text, 'mmsearch_errors_total{error_class="bad_input"}') >= 1
    assert _sample(text, 'mmsearch_errors_total{error_class="triton"}') == 0
    fingerprint = re.search(r'mmsearch_model_info\{fingerprint="([^"]+)"\} 1\.0', text).group(1)
    assert re.fullmatch(r"[0-9a-f]{12}-(fp32|optimized|int8)", fingerprint)  # weights hash + graph variant
    from client.encoder import resends

    assert _sample(text, "mmsearch_triton_resends_total") == resends()  # Triton 2.51's corrupted requests


def _sample(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_a_real_prometheus_scrapes_the_page_and_triton(served_page, triton, tmp_path):
    """docker/monitoring/prometheus.yml, targets pointed at loopback, run by Debian's Prometheus."""
    import json
    import subprocess
    import urllib.request

    import yaml

    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: run scripts/system-deps.sh (make test does)"
    config = yaml.safe_load((REPO / "docker" / "monitoring" / "prometheus.yml").read_text())
    targets = {"mmsearch-page": served_page.removeprefix("http://"),
               "triton": f"127.0.0.1:{triton.metrics_port}"}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["global"]["scrape_interval"] = "1s"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, health = time.monotonic() + 60, {}
        while set(health.values()) != {"up"} or len(health) < 2:
            assert prometheus.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"targets not up in 60 s: {health}"
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as r:
                    active = json.load(r)["data"]["activeTargets"]
            except OSError:
                continue
            health = {t["labels"]["job"]: t["health"] for t in active}
        assert health == {"mmsearch-page": "up", "triton": "up"}
    finally:
        prometheus.terminate()
        prometheus.wait(10)


def test_page_end_to_end_in_headless_chromium(served_page, products, tmp_path):
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is missing: run scripts/system-deps.sh (make test does)"
    photo = tmp_path / "query.jpg"
    photo.write_bytes(bytes(products.image[3]))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(served_page)
        page.wait_for_selector("#status >> text=triton: ok")
        page.fill("#q", products.title[5])
        page.click("button[type=submit]")
        page.wait_for_selector(".card")
        page.wait_for_function(
            "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
        titles = page.locator(".card .title").all_inner_texts()
        assert products.title[5] in titles[:3]
        page.screenshot(path=str(tmp_path / "text_search.png"))

        colour = page.locator('.facet[data-field="colour"]').first  # a click on a facet filters by it
        value = colour.inner_text().rsplit(" (", 1)[0]
        colour.click()
        page.wait_for_function(f"document.querySelector('input[name=colour]').value === {value!r}")
        page.wait_for_selector('#summary >> text=results for')
        page.wait_for_function(
            f"[...document.querySelectorAll('.card .meta')].every(m => m.textContent.includes({value!r}))")
        page.fill('input[name="colour"]', "")

        page.set_input_files("#file", str(photo))
        page.wait_for_selector('#summary >> text=results for "query.jpg"')
        first = page.locator(".card .score").first.inner_text()
        assert str(products.product_id[3]) in first

        page.fill("#q", "   ")
        page.click("button[type=submit]")
        assert "Type some words" in page.locator("#message").inner_text()
        browser.close()
    assert (tmp_path / "text_search.png").stat().st_size > 10_000  # kept in pytest's tmp dir for a look
