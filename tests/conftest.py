"""Shared fixtures: real catalog rows from ../shared/data/fashion, tiny models, temp dirs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub in tests

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fashion"
CATALOG = DATA / "catalog.parquet"
SAMPLE_CSV = DATA / "sample" / "products.csv"


@pytest.fixture(scope="session")
def catalog_path() -> Path:
    if not CATALOG.is_file():
        pytest.fail(f"the fashion catalog is missing at {CATALOG}: tests read real data from ../shared")
    return CATALOG


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A test-tiny checkpoint: real MiniLM weights, its top layer, a micro CNN and the heads trained briefly
    on real rows (enough for an exact title to find its product, which the search tests check, and for
    photo search to beat the untrained model on held-out products, which test_train checks)."""
    from training.train import TrainCfg, train

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = TrainCfg(model="test-tiny", catalog=str(CATALOG), limit=600, batch_size=32, epochs=5, lr=3e-3,
                   lr_pretrained=1e-4, val_queries=50, val_fraction=0.2, eval_at_start=True, out=str(out),
                   cache_dir=str(tmp_path_factory.mktemp("cache")))
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint, tmp_path_factory) -> Path:
    """`python -m export` on the tiny checkpoint: ONNX graphs, parity checks, a python-flavour repository."""
    from export.__main__ import main

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    main(["--checkpoint", str(tiny_checkpoint), "--out", str(repo), "--variant", "optimized",
          "--graphs-dir", str(tmp_path_factory.mktemp("graphs")),
          "--measure", "fp32,optimized,int8", "--catalog", str(CATALOG), "--parity-rows", "32"])
    return repo


def graphs_dir(repository: Path) -> Path:
    """The graphs folder an export wrote (build/graphs/<checkpoint>-<weights digest>/ by default)."""
    import json

    from core.specs import REPORT_FILE

    return Path(json.loads((repository / REPORT_FILE).read_text())["graphs_dir"])


@pytest.fixture(scope="session")
def triton(tiny_repository, tmp_path_factory):
    """A real tritonserver serving the tiny repository, on free ports."""
    from export.serve import TritonServer

    log = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer.on_free_ports(tiny_repository, log_file=log)
    server.start(timeout_s=180)
    yield server
    server.stop()


N_INDEXED = 300  # catalog products the shared collection holds


@pytest.fixture(scope="session")
def milvus_path(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "test.db")


@pytest.fixture(scope="session")
def milvus(milvus_path):
    from client import store

    client = store.connect(milvus_path)
    yield client
    client.close()


@pytest.fixture(scope="session")
def indexed(triton, milvus, catalog_path):
    """The first N_INDEXED catalog products, indexed through the real Triton into Milvus Lite."""
    from client.index import Indexer

    indexer = Indexer(triton.grpc_url, "grpc", milvus, "products", batch_size=16, concurrency=3)
    return indexer.run(str(catalog_path), limit=N_INDEXED)


@pytest.fixture(scope="session")
def catalog_with_codes(catalog_path, tmp_path_factory) -> tuple:
    """Real products: the first 200 of the catalog and 40 whose titles hold a model code."""
    import pandas as pd

    from training.make_lexical_sets import CODE

    df = pd.read_parquet(catalog_path)
    with_code = df[df["title"].str.lower().str.split().map(lambda ws: any(CODE.match(w) for w in ws))]
    subset = pd.concat([df.iloc[:200], with_code.iloc[:40]]).drop_duplicates("product_id")
    path = tmp_path_factory.mktemp("hybrid") / "catalog.parquet"
    subset.to_parquet(path)
    holders: dict[str, list[str]] = {}
    for pid, title in zip(subset["product_id"].astype(str), subset["title"]):
        for token in {w for w in title.lower().split() if CODE.match(w)}:
            holders.setdefault(token, []).append(pid)
    return path, sorted(holders.items())


@contextmanager
def serving(app) -> Iterator[str]:
    """An ASGI app on a free port, served by uvicorn in a thread: its URL."""
    import uvicorn

    from core.server_process import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def shared_deployment(tiny_repository: Path, base: Path, admin_key: str) -> Iterator[tuple]:
    """make serve's shape, for tests that load model sets into a running server: Triton in explicit model control
    with an admin key on a copy of the tiny repository (base/model_repository), and a Milvus server.
    Yields (triton, milvus, repository)."""
    import shutil

    from client.milvus_server import MilvusServer
    from core.server_process import free_port
    from export.serve import TritonServer

    repo = base / "model_repository"
    shutil.copytree(tiny_repository, repo)
    triton = TritonServer.on_free_ports(repo, log_file=base / "triton.log", model_control="explicit",
                                        admin_key=admin_key)
    triton.start(timeout_s=180)
    milvus = MilvusServer(base / "milvus", port=free_port())
    try:
        milvus.start()
        yield triton, milvus, repo
    finally:
        milvus.stop()
        triton.stop()


def titles_query_set(path: Path, products: int, queries: int = 60) -> Path:
    """A committed-set stand-in: the first `queries` titles of the catalog's first `products`, each relevant to
    its own product (what a gate can lose)."""
    import json

    from core.catalog import read_catalog

    df, _ = read_catalog(CATALOG, limit=products)
    path.write_text("".join(json.dumps({"query": t, "relevant": [str(i)]}) + "\n"
                            for i, t in zip(df.product_id[:queries], df.title[:queries])))
    return path
