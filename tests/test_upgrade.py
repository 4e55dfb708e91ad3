"""Upgrading the served model without downtime (client/upgrade.py) on the shared local Milvus (Lite over
TCP: no aliases, routes instead) and a real Triton in explicit model control: two independently trained
models, a switch under concurrent search load with zero failed and zero mixed queries, the evaluation
gate, a rollback, an upgrade after a rollback, a rollback after a plain client/index.py start, and a
switch that Milvus dies under."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import pytest

from client import serving, store
from client.encoder import TritonEncoder
from client.index import main as index_main
from client.milvus_server import MilvusServer
from client.search import RESOLVE_EVERY_S, Searcher
from client.upgrade import main as upgrade_main
from core.catalog import read_catalog
from core.server_process import free_port
from tests.conftest import CATALOG, shared_deployment, titles_query_set

pytestmark = pytest.mark.server
N = 150
ADMIN_KEY = "upgrade-test-key"


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory):
    """Another test-tiny model, trained like the first but from another seed: an unrelated vector space,
    so a query of one model searched in the other's vectors finds nothing it should."""
    from training.train import TrainCfg, train

    out = tmp_path_factory.mktemp("ckpt2") / "tiny-seed1"
    return train(TrainCfg(model="test-tiny", catalog=str(CATALOG), limit=600, batch_size=32, epochs=5, lr=3e-3,
                          lr_pretrained=1e-4, val_queries=50, val_fraction=0.2, seed=1, out=str(out),
                          cache_dir=str(tmp_path_factory.mktemp("cache2"))))


@pytest.fixture(scope="module")
def deployment(tiny_repository, second_checkpoint, tmp_path_factory):
    """Triton (explicit model control, admin key) on a copy of the tiny repository, and a Milvus server.
    The second model is exported as model set v2 after Triton started: the upgrade must load it."""
    from export.__main__ import main as export_main

    base = tmp_path_factory.mktemp("upgrade")
    with shared_deployment(tiny_repository, base, ADMIN_KEY) as (triton, milvus, repo):
        export_main(["--checkpoint", str(second_checkpoint), "--out", str(repo), "--tag", "v2", "--variant", "fp32",
                     "--measure", "fp32", "--graphs-dir", str(base / "graphs"), "--catalog", str(CATALOG),
                     "--parity-rows", "16"])
        yield triton, milvus, base


def _upgrade(triton, milvus, base, *args: str) -> int:
    queries = base / "titles.jsonl"
    if not queries.exists():
        titles_query_set(queries, N)
    return upgrade_main(["--catalog", str(CATALOG), "--limit", str(N), "--queries", str(queries), "--mode", "dense",
                         "--triton-url", triton.grpc_url, "--milvus-uri", milvus.uri, "--admin-key", ADMIN_KEY,
                         "--json", str(base / "report.json"), *args])


@dataclass
class Query:
    shopper: int
    started: float  # time.monotonic() when the search began
    finished: float
    collection: str
    model: str
    found: bool  # the product whose title was the query is among the top 5


class Shoppers:
    """Searchers querying in threads until stopped. The test waits on their progress (a condition), never on
    a sleep: "every shopper has finished 5 queries that started after t"."""

    def __init__(self, triton, milvus, titles: list[tuple[str, str]], name: str = "products", count: int = 3):
        self.queries: list[Query] = []
        self.errors: list[Exception] = []
        self.progress, self.stop = threading.Condition(), threading.Event()
        self.count = count
        self.threads = [threading.Thread(target=self._shop, args=(k, triton, milvus, titles, name))
                        for k in range(count)]
        for t in self.threads:
            t.start()

    def _shop(self, k: int, triton, milvus, titles, name) -> None:
        searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), store.connect(milvus.uri), name)
        i = k
        while not self.stop.is_set():
            pid, title = titles[i % len(titles)]
            started = time.monotonic()
            try:
                result = searcher.search(title, k=5, mode="dense")
                query = Query(k, started, time.monotonic(), result.collection, result.model,
                              pid in [h.product_id for h in result.hits])
            except Exception as exc:  # noqa: BLE001 - every failure is a failed query
                query = exc
            with self.progress:
                (self.errors if isinstance(query, Exception) else self.queries).append(query)
                self.progress.notify_all()
            i += 7

    def wait_for(self, since: float, each: int = 5) -> None:
        """Until every shopper has finished `each` queries started after `since` (or one failed)."""
        def done() -> bool:
            return bool(self.errors) or all(
                sum(q.shopper == k and q.started > since for q in self.queries) >= each for k in range(self.count))
        with self.progress:
            assert self.progress.wait_for(done, timeout=180), "the shoppers stopped making progress"

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_upgrade_and_rollback_under_load_fail_and_mix_no_query(deployment, capsys):
    """From a first deployment by upgrade.py: switch to a second model, refuse a worse one, roll back, and
    upgrade again after the rollback, with shoppers searching all along: 0 failed, 0 mixed queries."""
    triton, milvus, base = deployment
    assert _upgrade(triton, milvus, base, "--tag", "") == 0  # first deployment: the default model set
    first = json.loads((base / "report.json").read_text())
    assert first["promoted"] and first["current"] is None

    df, _ = read_catalog(CATALOG, limit=N)
    titles = list(zip(df.product_id.astype(str), df.title))
    shoppers = Shoppers(triton, milvus, titles)
    try:
        shoppers.wait_for(time.monotonic())
        assert _upgrade(triton, milvus, base, "--tag", "v2", "--tolerance", "0.2") == 0
        switched = time.monotonic()
        shoppers.wait_for(switched + RESOLVE_EVERY_S)
        report = json.loads((base / "report.json").read_text())
        old, new = first["candidate"], report["candidate"]
        assert report["promoted"] and report["current"] == old, report

        # The gate: a candidate that must beat the serving model by 1.0 nDCG is not promoted.
        assert _upgrade(triton, milvus, base, "--tag", "", "--tolerance", "-1.0") == 1
        refused = time.monotonic()
        # --recreate on the serving name would drop what every searcher uses: refused, with the way to do it.
        capsys.readouterr()
        assert index_main(["--recreate", "--milvus-uri", milvus.uri, "--triton-url", triton.grpc_url, "--catalog",
                           str(CATALOG), "--limit", "5"]) == 2
        assert "client/upgrade.py" in capsys.readouterr().err
        shoppers.wait_for(refused)

        rolling = time.monotonic()  # a switch happens inside the command: windows end where it starts
        assert upgrade_main(["--rollback", "--milvus-uri", milvus.uri]) == 0
        rolled = time.monotonic()
        shoppers.wait_for(rolled + RESOLVE_EVERY_S)

        # After a rollback, the same upgrade again: the candidate collection is kept, synced, switched to.
        upgrading = time.monotonic()
        assert _upgrade(triton, milvus, base, "--tag", "v2", "--tolerance", "0.2") == 0
        again = time.monotonic()
        shoppers.wait_for(again + RESOLVE_EVERY_S)
        assert json.loads((base / "report.json").read_text())["candidate"] == new
    finally:
        shoppers.close()

    client = store.connect(milvus.uri)
    record = serving.collection_record(client, "products")
    assert (record.collection, record.previous, store.count(client, new)) == (new, old, N)
    models = {name: serving.collection_record(client, name).fingerprint for name in (old, new)}
    assert models[old] != models[new]
    queries = shoppers.queries
    assert not shoppers.errors, shoppers.errors[:3]  # zero failed queries
    mixed = [q for q in queries if models.get(q.collection) != q.model]
    assert not mixed, mixed[:3]  # zero mixed: every query embedded by the model of the vectors it searched
    for name in (old, new):  # each model finds exact titles in its own space (a mixed query would not)
        served = [q for q in queries if q.collection == name]
        assert len(served) >= 10 and sum(q.found for q in served) / len(served) >= 0.6, (name, len(served))
    # Every query that started a resolution interval after a switch, and finished before the next switching
    # command started, searched what the switch chose.
    for start, end, expected in ((switched + RESOLVE_EVERY_S, rolling, new), (rolled + RESOLVE_EVERY_S, upgrading, old),
                                 (again + RESOLVE_EVERY_S, float("inf"), new)):
        window = [q.collection for q in queries if start < q.started and q.finished < end]
        assert window and set(window) == {expected}, (expected, set(window))
    client.close()


def test_rollback_after_a_plain_index_start_serves_the_first_collection_again(deployment):
    """A deployment started with client/index.py (a plain collection, as the compose indexer makes) and then
    upgraded: the rollback serves that plain collection again (it used to fail: the alias had renamed it)."""
    triton, milvus, base = deployment
    assert index_main(["--milvus-uri", milvus.uri, "--triton-url", triton.grpc_url, "--collection", "shop",
                       "--catalog", str(CATALOG), "--limit", str(N)]) == 0
    assert _upgrade(triton, milvus, base, "--tag", "v2", "--collection", "shop", "--tolerance", "1.0") == 0
    client = store.connect(milvus.uri)
    upgraded = serving.collection_record(client, "shop")
    assert upgraded.collection.startswith("shop__") and upgraded.previous == "shop"
    assert upgrade_main(["--rollback", "--milvus-uri", milvus.uri, "--collection", "shop"]) == 0
    back = serving.collection_record(client, "shop")
    assert back.collection == "shop" and back.previous == upgraded.collection and store.count(client, "shop") == N
    searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "shop")
    assert searcher.search("shirt", k=3, mode="hybrid").collection == "shop"
    client.close()


def test_upgrades_refuse_a_lite_file_with_what_to_do(tmp_path, capsys):
    assert upgrade_main(["--tag", "v2", "--milvus-uri", str(tmp_path / "lite.db")]) == 2
    assert "make serve" in capsys.readouterr().err


def test_milvus_killed_at_the_switch_leaves_the_old_model_serving_and_a_rerun_completes(deployment, tmp_path,
                                                                                        monkeypatch, capsys):
    """The switch is one row written to the routes collection; Milvus killed (kill -9) right before it: the
    upgrade exits non-zero saying Milvus is unreachable, the name still serves the old collection after a
    restart, and the same command then switches (the candidate's rows are kept) and rolls back."""
    triton, _, base = deployment
    milvus = MilvusServer(tmp_path / "milvus", port=free_port()).start()  # its own: it is killed
    try:
        assert _upgrade(triton, milvus, base, "--tag", "", "--collection", "store") == 0
        client = store.connect(milvus.uri)
        before = serving.collection_record(client, "store")
        client.close()
        real_switch = serving.switch

        def killed_first(*args, **kwargs):
            milvus.kill()  # SIGKILL of its process group, at the hook: the write that switches
            return real_switch(*args, **kwargs)

        monkeypatch.setattr(serving, "switch", killed_first)
        capsys.readouterr()
        assert _upgrade(triton, milvus, base, "--tag", "v2", "--collection", "store", "--tolerance", "1.0") == 2
        assert f"Milvus at {milvus.uri} is unreachable" in capsys.readouterr().err
        monkeypatch.undo()

        milvus = MilvusServer(tmp_path / "milvus", port=milvus.port).start()  # the same data, restarted
        client = store.connect(milvus.uri)
        assert serving.collection_record(client, "store") == before  # nothing half-switched
        searcher = Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "store")
        assert searcher.search("shirt", k=3, mode="dense").collection == before.collection
        assert _upgrade(triton, milvus, base, "--tag", "v2", "--collection", "store", "--tolerance", "1.0") == 0
        after = serving.collection_record(client, "store")
        assert after.collection != before.collection and after.previous == before.collection
        assert store.count(client, after.collection) == N
        assert upgrade_main(["--rollback", "--milvus-uri", milvus.uri, "--collection", "store"]) == 0
        assert serving.collection_record(client, "store").collection == before.collection
        client.close()
    finally:
        milvus.stop()
