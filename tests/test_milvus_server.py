"""The shared local index (python -m client.milvus_server: Milvus Lite 2.5.1 over TCP) as a deployment:
the page, search.py and the indexer at the same time on one server, hybrid search finding model codes
with two served evaluations running at once, hostile filters, and a `kill -9` of Milvus mid-index
followed by a resume that ends with exactly one row per product."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from client import store
from client.capabilities import capabilities
from client.encoder import TritonEncoder
from client.filters import filter_expression
from client.index import Indexer
from client.milvus_server import MilvusServer
from client.search import Searcher
from core.catalog import read_catalog
from export.serve import free_port

pytestmark = pytest.mark.server
REPO = Path(__file__).resolve().parents[1]
N = 200


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MilvusServer(tmp_path_factory.mktemp("milvus-server"), port=free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def indexed(server, triton, catalog_with_codes):
    """Real products (N of them, some with model codes) indexed through the real Triton into the server."""
    client = store.connect(server.uri)
    report = Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_with_codes[0]))
    yield client, report
    client.close()


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"client/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_server_says_what_it_is_and_the_collection_gets_what_it_supports(indexed):
    client, report = indexed
    assert report.added == report.catalog_rows >= N and report.indexed == report.added and not report.failed
    assert store.count(client, "products") == report.added  # strong consistency: right after the last upsert
    caps = capabilities(client)
    assert caps.server == "Milvus Lite" and caps.bm25 and not caps.aliases and "HNSW" not in caps.index_types
    assert store.collection_index(client, "products") == ("AUTOINDEX", store.METRIC)  # the best Lite has
    assert store.has_lexical(client, "products")
    with pytest.raises(store.StoreError, match="no HNSW index"):  # asked for what it lacks: refused, with the list
        store.ensure_collection(client, 8, "hnsw_refused", index_type="HNSW")
    assert not client.has_collection("hnsw_refused")


def test_page_search_and_indexer_share_the_server(server, triton, indexed, catalog_with_codes):
    catalog_path = catalog_with_codes[0]
    df, _ = read_catalog(catalog_path, limit=N)
    title, pid = df.title[7], str(df.product_id[7])
    port = free_port()
    page = subprocess.Popen([sys.executable, "client/app.py", "--triton-url", triton.grpc_url, "--milvus-uri",
                             server.uri, "--port", str(port), "--catalog", str(catalog_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": title, "k": 5})
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                assert page.poll() is None and time.monotonic() < deadline, "the page did not come up"
                time.sleep(0.5)
        assert pid in [h["product_id"] for h in body["hits"]]
        # With the page up, the CLI search and the indexer use the same collections (Lite: "opened by another
        # program").
        searched = _cli("search.py", title, "-k", "5", "--json", "--triton-url", triton.grpc_url,
                        "--milvus-uri", server.uri)
        assert searched.returncode == 0, searched.stderr
        assert pid in [h["product_id"] for h in json.loads(searched.stdout)["hits"]]
        assert json.loads(searched.stdout)["mode"] == "hybrid" and not searched.stderr.strip()
        synced = _cli("index.py", "--catalog", str(catalog_path), "--triton-url", triton.grpc_url,
                      "--milvus-uri", server.uri)
        rows = indexed[1].added
        assert synced.returncode == 0, synced.stderr
        assert f"unchanged {rows}" in synced.stderr and f"now holds {rows} products" in synced.stderr
        with urllib.request.urlopen(url, timeout=10) as response:
            assert pid in [h["product_id"] for h in json.loads(response.read())["hits"]]
    finally:
        page.terminate()
        page.wait(30)


def test_two_served_evaluations_at_once_find_model_codes_first(server, triton, indexed, catalog_with_codes,
                                                               tmp_path):
    """Hybrid search on the shared server keeps what the demo's Lite file gives: a shopper typing a model code
    gets its product at rank 1 (dense alone rarely does), with two evaluations running against it at once."""
    catalog_path, codes = catalog_with_codes
    assert len(codes) >= 30
    queries = tmp_path / "codes.jsonl"
    queries.write_text("".join(json.dumps({"query": code, "relevant": pids}) + "\n" for code, pids in codes))
    runs = {mode: subprocess.Popen([sys.executable, "client/evaluate.py", "--queries", str(queries), "--catalog",
                                    str(catalog_path), "--mode", mode, "--triton-url", triton.grpc_url,
                                    "--milvus-uri", server.uri, "--json", str(tmp_path / f"{mode}.json")],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for mode in ("hybrid", "dense")}
    for mode, run in runs.items():
        assert run.wait(180) == 0, (mode, run.stderr.read())
    first = {mode: json.loads((tmp_path / f"{mode}.json").read_text())["metrics"]["text"]["recall@1"]
             for mode in runs}
    assert first["hybrid"] >= 0.95 and first["hybrid"] > first["dense"] + 0.2, first


@pytest.mark.parametrize("value", ['Red" or product_id != "', "Red') or (1 == 1", "\\\"", "Navy Blue\n"])
def test_hostile_filter_values_stay_values_on_the_server(server, triton, indexed, value):
    client, _ = indexed
    searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "products")
    assert searcher.search("shirt", k=10, expression=filter_expression({"colour": value})).hits == []


def test_milvus_killed_mid_index_then_a_resume_leaves_one_row_per_product(triton, catalog_path, tmp_path,
                                                                          monkeypatch):
    data, port = tmp_path / "milvus", free_port()
    first = MilvusServer(data, port=port).start()  # its own server: the shared one keeps serving the others
    client = store.connect(first.uri)
    indexer = Indexer(triton.grpc_url, "grpc", client, "products", batch_size=8, concurrency=2, write_every=32,
                      milvus_timeout_s=10)
    # The crash comes right after the indexer's second write returns: a watcher thread polling the
    # count raced the indexer (a fast machine indexed all N before it saw 64 rows).
    real_upsert, written = store.upsert, []

    def upsert_then_crash(*args, **kwargs):
        written.append(real_upsert(*args, **kwargs))
        if sum(written) >= 64 and first.process.poll() is None:
            first.kill()  # SIGKILL, no shutdown
        return written[-1]

    monkeypatch.setattr(store, "upsert", upsert_then_crash)
    try:
        with pytest.raises(Exception) as failure:
            indexer.run(str(catalog_path), limit=N)
        assert first.process.poll() is not None, f"Milvus was not killed; the indexer failed with {failure.value!r}"
    finally:
        monkeypatch.undo()
        first.stop()
        client.close()

    with MilvusServer(data, port=port) as second:  # the same data directory, restarted
        client = store.connect(second.uri)
        kept = store.count(client, "products")
        assert 64 <= kept < N, kept
        report = Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=N)
        assert report.added == N - kept and report.unchanged == kept and not report.failed
        assert store.count(client, "products") == N  # counts duplicates too
        assert len(store.read_digests(client, "products")) == N  # distinct ids: exactly one row each
        client.close()
