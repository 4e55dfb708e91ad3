"""The local Milvus standalone server (python -m client.milvus_server, PyPI's milvus 2.3.5) as a deployment:
the page, search.py and the indexer at the same time on one server with HNSW, served evaluation, and
a `kill -9` of Milvus mid-index followed by a resume that ends with exactly one row per product."""

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
from client.index import Indexer
from client.milvus_server import MilvusServer
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
def hnsw(server, triton, catalog_path):
    """N catalog products indexed through the real Triton into the server, HNSW."""
    client = store.connect(server.uri)
    report = Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=N, index_type="HNSW")
    yield client, report
    client.close()


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"client/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_index_counts_every_product_at_once_with_hnsw(hnsw):
    client, report = hnsw
    assert report.added == N and report.indexed == N and not report.failed
    assert store.count(client, "products") == N  # strong consistency: right after the last upsert
    assert store.collection_index(client, "products") == ("HNSW", store.METRIC)
    assert not store.has_lexical(client, "products")  # 2.3 has no BM25: made dense-only, said once


def test_page_search_and_indexer_share_the_server(server, triton, hnsw, catalog_path):
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
        assert "dense" in searched.stderr  # hybrid asked, no BM25 on 2.3: the note says what it did
        synced = _cli("index.py", "--catalog", str(catalog_path), "--limit", str(N), "--triton-url", triton.grpc_url,
                      "--milvus-uri", server.uri)
        assert synced.returncode == 0, synced.stderr
        assert f"unchanged {N}" in synced.stderr and f"now holds {N} products" in synced.stderr
        with urllib.request.urlopen(url, timeout=10) as response:
            assert pid in [h["product_id"] for h in json.loads(response.read())["hits"]]
    finally:
        page.terminate()
        page.wait(30)


def test_served_evaluation_on_the_server(server, triton, hnsw, catalog_path, tmp_path):
    df, _ = read_catalog(catalog_path, limit=N)
    queries = tmp_path / "titles.jsonl"
    queries.write_text("".join(json.dumps({"query": t, "relevant": [str(i)]}) + "\n"
                               for i, t in zip(df.product_id[:50], df.title[:50])))
    evaluated = _cli("evaluate.py", "--queries", str(queries), "--catalog", str(catalog_path), "--triton-url",
                     triton.grpc_url, "--milvus-uri", server.uri, "--json", str(tmp_path / "served.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "served.json").read_text())["metrics"]["text"]
    assert metrics["queries"] == 50 and metrics["recall@10"] >= 0.75  # exact titles, tiny model


def test_milvus_killed_mid_index_then_a_resume_leaves_one_row_per_product(triton, catalog_path, tmp_path,
                                                                          monkeypatch):
    data, port = tmp_path / "milvus", free_port()
    first = MilvusServer(data, port=port).start()
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
            indexer.run(str(catalog_path), limit=N, index_type="HNSW")
        assert first.process.poll() is not None, f"Milvus was not killed; the indexer failed with {failure.value!r}"
    finally:
        monkeypatch.undo()
        first.stop()
        client.close()

    with MilvusServer(data, port=port) as second:  # the same data directory, restarted
        client = store.connect(second.uri)
        client.load_collection("products")  # a restarted 2.3 server holds collections unloaded until asked
        kept = store.count(client, "products")
        assert 64 <= kept < N, kept
        report = Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=N)
        assert report.added == N - kept and report.unchanged == kept and not report.failed
        assert store.count(client, "products") == N  # counts duplicates too
        assert len(store.read_digests(client, "products")) == N  # distinct ids: exactly one row each
        client.close()
