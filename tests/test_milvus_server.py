"""The shared local index (python -m client.milvus_server: Milvus Lite 2.5.1 over TCP) as a deployment:
the page, search.py and the indexer at the same time on one server, hybrid search finding model codes
with two served evaluations running at once, hostile filters, outages under the real page (Milvus hung,
Milvus killed with kill -9 and restarted, Triton hung), and a `kill -9` of Milvus mid-index followed by
a resume that ends with exactly one row per product."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from client import store
from client.capabilities import capabilities
from client.encoder import TritonEncoder
from client.filters import filter_expression
from client.index import Indexer
from client.index import main as index_main
from client.milvus_server import MilvusServer
from client.search import Searcher
from core.catalog import read_catalog
from core.server_process import free_port

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


@pytest.mark.parametrize("value", ['Red" or product_id != "', "Red') or (1 == 1", "\\\"", "ñandú"])
def test_hostile_filter_values_stay_values_on_the_server(server, triton, indexed, value):
    client, _ = indexed
    searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "products")
    assert searcher.search("shirt", k=10, expression=filter_expression({"colour": value})).hits == []
    with pytest.raises(ValueError, match="line break"):  # Milvus's lexer refuses one inside a string
        filter_expression({"colour": value + "\n"})


def test_milvus_killed_mid_index_exits_clearly_and_a_rerun_leaves_one_row_per_product(triton, catalog_path, tmp_path,
                                                                                     monkeypatch, capsys):
    """client/index.py (the indexer and the nightly sync) with Milvus killed under it: a non-zero exit that says
    what is down, nothing written is lost, and the same command resumes."""
    data, port = tmp_path / "milvus", free_port()
    first = MilvusServer(data, port=port).start()  # its own server: the shared one keeps serving the others
    command = ["--milvus-uri", first.uri, "--triton-url", triton.grpc_url, "--catalog", str(catalog_path),
               "--limit", str(N), "--batch-size", "8", "--concurrency", "2", "--write-every", "32"]
    # The kill comes inside the indexer's third write, a hook: a watcher thread polling the count raced the
    # indexer (a fast machine indexed all N before it saw the rows).
    real_upsert, written = store.upsert, []

    def crash_on_the_third_write(*args, **kwargs):
        if len(written) == 2:
            first.kill()  # SIGKILL of the server's process group, no shutdown
        written.append(real_upsert(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(store, "upsert", crash_on_the_third_write)
    try:
        assert index_main(command) == 2
    finally:
        monkeypatch.undo()
        first.stop()
    err = capsys.readouterr().err
    assert f"error: Milvus at {first.uri} is unreachable" in err and "run the same command again to resume" in err
    assert "Traceback" not in err and len(written) == 2

    with MilvusServer(data, port=port) as second:  # the same data directory, restarted
        client = store.connect(second.uri)
        kept = store.count(client, "products")
        assert kept == sum(written) >= 64  # both acknowledged writes survived the kill
        assert index_main(command[:1] + [second.uri] + command[2:]) == 0
        assert store.count(client, "products") == N  # counts duplicates too
        assert len(store.read_digests(client, "products")) == N  # distinct ids: exactly one row each
        client.close()


PAGE_TIMEOUT_S = 2  # the page's --timeout in the outage test: every answer within it plus a second


def _get(url: str) -> tuple[int, float, dict]:
    """(status, seconds, JSON body) of one request to the page; the client's own limit is far above the page's."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        status, body = exc.code, json.loads(exc.read())
    return status, time.monotonic() - started, body


def _all_at_once(urls: list[str]) -> list[tuple[int, float, dict]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(urls)) as pool:
        return list(pool.map(_get, urls))


def test_the_page_answers_outages_within_its_deadline_and_recovers_by_itself(triton, catalog_path, tmp_path):
    """The real page on the real server: Milvus hung (SIGSTOP), Milvus killed (kill -9 of its process group)
    and restarted, Triton hung. Every request during an outage is a 503 within the deadline + 1 s that says
    what is down; the first search once the dependency is back succeeds, with no page restart."""
    data, port = tmp_path / "milvus", free_port()
    milvus = MilvusServer(data, port=port).start()  # its own server: the module's keeps serving the others
    client = store.connect(milvus.uri)
    Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=60)
    client.close()
    page_port = free_port()
    page = subprocess.Popen([sys.executable, "client/app.py", "--triton-url", triton.grpc_url, "--milvus-uri",
                             milvus.uri, "--port", str(page_port), "--catalog", str(catalog_path), "--timeout",
                             str(PAGE_TIMEOUT_S)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{page_port}"
    search, health = f"{base}/api/search?q=shirt&k=3", f"{base}/api/health"
    try:
        deadline = time.monotonic() + 60
        while True:  # the page starting up (reads the catalog), not a fault
            try:
                status, _, _ = _get(search)
                break
            except urllib.error.URLError:
                assert page.poll() is None and time.monotonic() < deadline, page.stderr.read() if page.poll() else ""
                time.sleep(0.2)
        assert status == 200
        limit = PAGE_TIMEOUT_S + 1

        os.killpg(milvus.process.pid, signal.SIGSTOP)  # hung: connections accepted, nothing answered
        try:
            hung = _all_at_once([search] * 4 + [health])
        finally:
            os.killpg(milvus.process.pid, signal.SIGCONT)
        for status, seconds, body in hung[:4]:
            assert status == 503 and seconds < limit, (status, seconds, body)
            assert body["error"] == f"Milvus at {milvus.uri} did not answer within {PAGE_TIMEOUT_S} s"
        status, seconds, body = hung[4]
        assert status == 503 and seconds < limit and body["triton"] == "ok", (seconds, body)
        assert body["milvus"].startswith("unhealthy: Milvus") and "did not answer" in body["milvus"]
        status, _, body = _get(search)
        assert status == 200 and body["hits"], body  # resumed: the first search after it answers again

        milvus.kill()  # kill -9 of the server's whole process group
        down = _all_at_once([search] * 4 + [health])
        for status, seconds, body in down[:4]:
            assert status == 503 and seconds < limit, (status, seconds, body)
            assert body["error"].startswith(f"Milvus at {milvus.uri} is unreachable"), body
            assert " object at 0x" not in body["error"] and "Exception" not in body["error"]
        assert down[4][0] == 503 and "unreachable" in down[4][2]["milvus"], down[4]
        for status, seconds, body in _all_at_once([search] * 4 + [health]):  # still down: one probes, the rest
            assert status == 503 and seconds < limit and "unreachable" in json.dumps(body), (seconds, body)

        milvus = MilvusServer(data, port=port).start()  # the same data, restarted; the page is not
        status, seconds, body = _get(search)
        assert status == 200 and len(body["hits"]) == 3, (status, body)
        assert _get(health)[2] == {"triton": "ok", "milvus": "ok"}

        os.killpg(triton.process.pid, signal.SIGSTOP)  # Triton hung: the same promise for the other dependency
        try:
            hung = _all_at_once([search] * 3)
        finally:
            os.killpg(triton.process.pid, signal.SIGCONT)
        for status, seconds, body in hung:
            assert status == 503 and seconds < limit and body["error"].startswith("Triton "), body
            assert body["error"].endswith(f"at grpc://{triton.grpc_url}"), body  # one sentence: what is down
        status, _, body = _get(search)
        assert status == 200 and body["hits"], body
    finally:
        page.terminate()
        page.wait(30)
        milvus.stop()
    assert page.poll() is not None


def test_a_hung_server_never_turns_a_new_collection_dense_only(tmp_path):
    """Capabilities are asked, not guessed from a failure: a timeout while making a collection raises (with
    the deadline), creates nothing, and the next try makes the full BM25 collection."""
    with MilvusServer(tmp_path / "milvus", port=free_port()) as milvus:
        client = store.connect(milvus.uri, timeout_s=1, batch_timeout_s=1)
        os.killpg(milvus.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as hung:
                store.ensure_collection(client, 8, "fresh")
        finally:
            os.killpg(milvus.process.pid, signal.SIGCONT)
        assert hung.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert store.failure(hung.value, milvus.uri, 1) == f"Milvus at {milvus.uri} did not answer within 1 s"
        assert not client.has_collection("fresh")
        store.ensure_collection(client, 8, "fresh")
        assert store.has_lexical(client, "fresh")
        client.close()
