"""Which Milvus engine can serve this project's index as a SHARED server on this machine (no Docker)?

    python bench/milvus_engines.py                                   # all engines, 44,072 and 1,000,000 rows
    python bench/milvus_engines.py --engines lite25,milvus23 --sizes 5000 --vectors synthetic
    python bench/milvus_engines.py --render                          # re-render md/png from the json

Engines, each run as a server in its own process group (stopped by killing the group):
  lite25    Milvus Lite 2.5.1 (C++ engine) served over TCP by `milvus_lite.server.Server(db, address=...)`
  lite3     Milvus Lite 3.2.2 (pure Python over faiss): `python -m milvus_lite server --data-dir ...`
  milvus23  PyPI `milvus` 2.3.5: `milvus run standalone` with embedded etcd and local storage

All of them are driven from one client venv (pymilvus 3.0.2); an engine that client cannot talk to is
driven by pymilvus 2.6.17 instead (recorded). Per engine it probes capabilities with real calls, then per
size measures insert rate, index build / load, dense top-10 / top-100 latency and queries/s at
concurrency 1 and 16 (threads, each with its own MilvusClient), recall against numpy brute force, BM25
top-100 where supported (at the catalog size), and finally restart-and-recover after kill -9.

Virtual environments: created on first use under --venv-dir (PyPI needed once), one per engine plus the
clients, so the owner can re-run everything with one command. By hand, the same is:

    python3 -m venv V/client   && V/client/bin/pip install pymilvus==3.0.2 'numpy>=2' pandas pyarrow matplotlib tqdm
    python3 -m venv V/client26 && V/client26/bin/pip install pymilvus==2.6.17 'numpy>=2' pandas pyarrow matplotlib tqdm
    python3 -m venv V/lite25   && V/lite25/bin/pip install milvus-lite==2.5.1 'setuptools<81'
    python3 -m venv V/lite3    && V/lite3/bin/pip install milvus-lite==3.2.2 pymilvus==3.0.2 'numpy>=2'
    python3 -m venv V/milvus23 && V/milvus23/bin/pip install milvus==2.3.5 'setuptools<81'

The script needs only the standard library to start: it builds the venvs, then re-runs itself with the
client venv's python. It imports nothing from the project (which may change under it): it only reads files.

Vectors: `--vectors lite:PATH` reads product ids, embeddings and text from a copy of a Milvus Lite 2.5.1 file
(collection `products`, made by `make demo`; the original is never opened), `--vectors synthetic` makes
clustered unit vectors (dim 256) with the catalog's text, `auto` takes runs/milvus.db once runs/demo.done
exists. Larger sizes add perturbed copies (Gaussian noise, renormalized) of the base vectors. Dense queries:
300 perturbed copies of random products, not themselves in the collection. BM25 queries: the `query` field
of the fashion-codes and fashion-names evaluation sets. Writes bench/results/milvus_engines.{json,md,png}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CATALOG = ROOT.parent / "shared" / "data" / "fashion" / "catalog.parquet"
EVAL_SETS = [ROOT / "training" / "eval_sets" / f"fashion-{name}.jsonl" for name in ("codes", "names")]
DEMO_DB, DEMO_DONE = ROOT / "runs" / "milvus.db", ROOT / "runs" / "demo.done"

logger = logging.getLogger("bench.milvus_engines")

VENVS = {
    "client": ["pymilvus==3.0.2", "numpy>=2", "pandas", "pyarrow", "matplotlib", "tqdm"],
    "client26": ["pymilvus==2.6.17", "numpy>=2", "pandas", "pyarrow", "matplotlib", "tqdm"],
    "lite25": ["milvus-lite==2.5.1", "setuptools<81"],
    "lite3": ["milvus-lite==3.2.2", "pymilvus==3.0.2", "numpy>=2"],
    "milvus23": ["milvus==2.3.5", "setuptools<81"],
}
ENGINES = {
    "lite25": {"label": "Milvus Lite 2.5.1 (C++, TCP)", "package": "milvus-lite"},
    "lite3": {"label": "Milvus Lite 3.2.2 (Python/faiss)", "package": "milvus-lite"},
    "milvus23": {"label": "Milvus standalone 2.3.5", "package": "milvus"},
}
CLIENTS = {"client": "pymilvus 3.0.2", "client26": "pymilvus 2.6.17"}
DIM_SYNTHETIC = 256
METRIC = "IP"
ANALYZER = {"type": "standard"}  # as the project's collection (client/store.py)
HNSW_BUILD = {"M": 16, "efConstruction": 200}
FALLBACK_INDEXES = {"IVF_FLAT": ({"nlist": 1024}, {"nprobe": 64}), "FLAT": ({}, {}), "AUTOINDEX": ({}, {})}
SHARED_NOTE = ("2 CPU cores shared with the owner's tests and training during the run: absolute numbers are noisy; "
               "compare engines within this run (each engine ran alone, the others stopped)")

# ----------------------------------------------------------------------------------------------------
# venvs and process groups (standard library only: this part runs before any venv exists)


def venv_python(venv_dir: Path, name: str) -> Path:
    return venv_dir / name / "bin" / "python"


def ensure_venv(venv_dir: Path, name: str) -> Path:
    python = venv_python(venv_dir, name)
    marker = venv_dir / name / ".milvus_engines-ok"
    if marker.exists():
        return python
    logger.info("creating venv %s (%s)", venv_dir / name, " ".join(VENVS[name]))
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir / name)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *VENVS[name]], check=True)
    marker.write_text(json.dumps(VENVS[name]))
    return python


def package_version(python: Path, package: str) -> str:
    out = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or f"unknown ({out.stderr.strip()[-200:]})"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    return True
            except (OSError, IndexError, ValueError):
                continue
    return False


# ----------------------------------------------------------------------------------------------------
# servers


class Server:
    """One engine as a server in its own session/process group, on a data directory that survives restarts."""

    def __init__(self, engine: str, venv_dir: Path, data_dir: Path, pgid_file: Path, port: int | None = None,
                 db_file: Path | None = None):
        self.engine, self.venv_dir, self.data_dir, self.pgid_file = engine, venv_dir, Path(data_dir), pgid_file
        self.db_file = Path(db_file) if db_file else self.data_dir / "bench.db"  # lite25 only
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log_file = self.data_dir.parent / f"{self.data_dir.name}.{engine}.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> tuple[list[str], dict, Path]:
        python = str(venv_python(self.venv_dir, self.engine))
        env = dict(os.environ)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.engine == "lite25":
            code = ("import signal\nfrom milvus_lite.server import Server\n"
                    f"s = Server({str(self.db_file)!r}, address='127.0.0.1:{self.port}')\n"
                    "assert s.init() and s.start(), 'milvus-lite did not start'\nsignal.pause()\n")
            return [python, "-c", code], env, self.data_dir
        if self.engine == "lite3":
            return [python, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir / "lite3"), "--host",
                    "127.0.0.1", "--port", str(self.port), "--max-workers", "16"], env, self.data_dir
        # milvus23: configure as client/milvus_server.py does, in the server's venv, then run the binary directly
        prep = subprocess.run([python, "-c", MILVUS23_PREP, str(self.data_dir), str(self.port)], capture_output=True,
                              text=True, timeout=300)
        if prep.returncode != 0:
            raise RuntimeError(f"milvus 2.3.5 configuration failed: {prep.stderr[-2000:]}")
        spec = json.loads(prep.stdout.strip().splitlines()[-1])
        env.update(spec["env"])
        return spec["argv"], env, Path(spec["cwd"])

    def start(self) -> None:
        argv, env, cwd = self.command()
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        with open(self.pgid_file, "a") as f:
            f.write(f"{self.process.pid}\n")
        logger.info("%s server starting on %s (pgid %d, log %s)", self.engine, self.uri, self.process.pid,
                    self.log_file)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from now until list_collections answers."""
        from pymilvus import MilvusClient

        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.engine} exited with {self.process.returncode}; see {self.log_file}")
            try:
                client = MilvusClient(uri=self.uri, timeout=3)
                try:
                    client.list_collections(timeout=3)
                finally:
                    client.close()
                return time.perf_counter() - started
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError(f"{self.engine} not ready after {timeout_s:.0f}s; see {self.log_file}")

    def kill(self) -> None:
        """kill -9 of the whole process group (wrapper and the engine it forked)."""
        if self.process is None:
            return
        kill_group(self.process.pid)
        self.process.wait()
        for _ in range(50):
            if not group_alive(self.process.pid):
                break
            time.sleep(0.1)


MILVUS23_PREP = r'''
import json, os, socket, sys
from pathlib import Path
from milvus import MilvusServerConfig, _initialize_data_files

data, port = Path(sys.argv[1]), int(sys.argv[2])
host = "127.0.0.1"

def reusable(p):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, p)); s.listen(); return s
    except OSError:
        s.close(); return None

def bindable(p):
    s = reusable(p)
    if s: s.close()
    return s is not None

saved = data / "etcd-ports.json"
ports = json.loads(saved.read_text()) if saved.is_file() else None
if not ports or not all(bindable(p) for p in ports.values()):
    client = next(p for p in range(2379, 2479) if bindable(p))
    peer = next(p for p in range(client + 1, client + 101) if bindable(p))
    ports = {"client": client, "peer": peer}
    data.mkdir(parents=True, exist_ok=True); saved.write_text(json.dumps(ports))
config = MilvusServerConfig(data_dir=str(data), proxy_port=port, etcd_port=ports["client"])
for c in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode"):
    config.set(f"{c}.ip", host)
config.try_bind_port = reusable
config.resolve()
_initialize_data_files(config.base_data_dir)
health, sock = config.resolve_port(9091); sock.close()
base = Path(config.base_data_dir)
cu, pu = f"http://{host}:{ports['client']}", f"http://{host}:{ports['peer']}"
etcd = base / "configs" / "embedEtcd.yaml"
etcd.write_text(f"name: default\nlisten-client-urls: {cu}\nadvertise-client-urls: {cu}\nlisten-peer-urls: {pu}\n"
                f"initial-advertise-peer-urls: {pu}\ninitial-cluster: default={pu}\n")
yml = base / "configs" / "milvus.yaml"
text = yml.read_text()
if "\n  config:\n    path:" not in text:
    text = text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd}\n", 1)
yml.write_text(text)
binary = base / "bin" / "milvus"
env = {"DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(health), "MILVUS_RUN_DIR": str(base / "run"),
       "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(binary.parent), os.environ.get("LD_LIBRARY_PATH")]))}
print(json.dumps({"argv": [str(binary), "run", "standalone"], "env": env, "cwd": str(base)}))
'''

# ----------------------------------------------------------------------------------------------------
# data (client venv: numpy, pandas)


def grow(base, size: int, sigma: float, seed: int = 0):
    """`size` unit vectors: the base ones, then perturbed copies of them (renormalized)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts, have = [base[:size]], min(len(base), size)
    while have < size:
        take = base[: size - have]
        noisy = take + rng.normal(0.0, sigma, take.shape).astype(np.float32)
        parts.append(noisy / np.linalg.norm(noisy, axis=1, keepdims=True))
        have += len(take)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def exact_top(queries, vectors, k: int):
    """Exact top-k ids (row numbers) by inner product, best first."""
    import numpy as np

    out = []
    for start in range(0, len(queries), 32):
        scores = queries[start:start + 32] @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)


def catalog_texts() -> tuple[list[str], list[str]]:
    import pandas as pd

    frame = pd.read_parquet(CATALOG, columns=["product_id", "title", "description"])
    texts = (frame["title"].fillna("").astype(str) + " " + frame["description"].fillna("").astype(str)).str.strip()
    return frame["product_id"].astype(str).tolist(), texts.tolist()


def synthetic_vectors(n: int, dim: int, clusters: int = 1000, spread: float = 0.04, seed: int = 0):
    """Clustered unit vectors: `clusters` random centres, each point a centre plus Gaussian noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[rng.integers(0, clusters, n)] + rng.normal(0, spread, (n, dim)).astype(np.float32)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def prepare_data(args, cache: Path, source: str) -> dict:
    """Base vectors, texts, dense and BM25 queries, cached under `cache` (npy + json)."""
    import numpy as np

    tag = "synthetic" if source == "synthetic" else "lite-" + hashlib.sha1(source.encode()).hexdigest()[:10]
    out = cache / f"data-{tag}"
    meta_file = out / "meta.json"
    if meta_file.exists() and not args.refresh_data:
        return json.loads(meta_file.read_text()) | {"dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    if source == "synthetic":
        ids, texts = catalog_texts()
        base = synthetic_vectors(len(ids), DIM_SYNTHETIC)
        origin = (f"synthetic: {DIM_SYNTHETIC}-d clustered unit vectors (1000 centres, per-dim noise 0.04); "
                  f"text from {CATALOG.name} (title + description)")
    else:
        path = Path(source.split(":", 1)[1])
        copy = cache / "source-copy" / path.name
        shutil.rmtree(copy.parent, ignore_errors=True)
        copy.parent.mkdir(parents=True)
        (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
        logger.info("copied %s to %s (the original is never opened)", path, copy)
        read_out = out / "read.json"
        run_worker(args, "read", args.client or "client", read_out, extra=["--read-path", str(copy)],
                   timeout_s=1200)
        read = json.loads(read_out.read_text())
        if read.get("status") != "ok":
            raise SystemExit(f"could not read {path}: {read.get('error')}")
        ids, texts = read["ids"], read["texts"]
        base = np.load(out / "read-vectors.npy")
        origin = f"real product embeddings read from a copy of {path} ({read['read_by']}, {read['collection']})"
        if read.get("text_from_catalog"):
            origin += "; text joined from the catalog"
    rng = np.random.default_rng(1)
    picks = rng.choice(len(base), args.queries, replace=False)
    noisy = base[picks] + rng.normal(0, args.query_sigma, (args.queries, base.shape[1])).astype(np.float32)
    queries = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    bm25 = [json.loads(line)["query"] for f in EVAL_SETS for line in f.read_text().splitlines() if line.strip()]
    np.save(out / "base.npy", base)
    np.save(out / "queries.npy", queries)
    (out / "texts.json").write_text(json.dumps({"ids": ids, "texts": texts}))
    (out / "bm25.json").write_text(json.dumps(bm25))
    meta = {"source": source, "origin": origin, "rows": len(base), "dim": int(base.shape[1]),
            "dense_queries": int(args.queries), "query_sigma": args.query_sigma, "query_products": picks.tolist(),
            "bm25_queries": len(bm25), "bm25_sets": [f.name for f in EVAL_SETS]}
    meta_file.write_text(json.dumps(meta))
    return meta | {"dir": str(out)}


# ----------------------------------------------------------------------------------------------------
# worker: one task against one engine, in the client venv; writes its result file after every stage


class Deadline(Exception):
    pass


class Worker:
    def __init__(self, args):
        self.args, self.engine = args, args.worker_engine
        self.out = Path(args.worker_out)
        self.work = self.out.parent
        self.began = time.monotonic()
        self.deadline = self.began + args.deadline_min * 60
        self.result: dict = {"engine": self.engine, "task": args.worker, "status": "running", "stage": "start"}
        self.server: Server | None = None

    def remaining(self) -> int:
        return max(1, int(self.deadline - time.monotonic()))

    def t(self, cap: int = 600) -> int:
        """An integer timeout (pymilvus retries 75 times unless it is an int) within the deadline."""
        return max(1, min(cap, self.remaining()))

    def check(self, where: str) -> None:
        if time.monotonic() > self.deadline:
            raise Deadline(where)

    def save(self, **fields) -> None:
        if fields.get("stage") and fields["stage"] != self.result.get("stage"):  # when each stage began
            self.result.setdefault("stage_started_s", {})[fields["stage"]] = round(time.monotonic() - self.began, 1)
        self.result.update(fields)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        tmp.replace(self.out)

    def client(self):
        from pymilvus import MilvusClient

        return MilvusClient(uri=self.server.uri, timeout=self.t(30))

    def start_server(self, data_dir: Path, port: int | None = None) -> float:
        self.server = Server(self.engine, Path(self.args.venv_dir), data_dir, self.work / "server.pgids", port)
        started = time.perf_counter()
        self.server.start()
        self.server.wait_ready(min(240, self.remaining()))
        return time.perf_counter() - started

    def run(self) -> None:
        import pymilvus

        for name in [n for n in logging.root.manager.loggerDict if n.startswith("pymilvus")] + ["pymilvus"]:
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its retries log every refused connection
        self.save(client=f"pymilvus {pymilvus.__version__}")
        try:
            if self.args.worker == "read":
                self.read()
            elif self.args.worker == "caps":
                self.caps()
            elif self.args.worker == "size":
                self.size(self.args.size)
            elif self.args.worker == "recover":
                self.recover()
            if self.result["status"] == "running":
                self.save(status="ok")
        except Deadline as exc:
            logger.warning("%s %s: deadline reached at %s", self.engine, self.args.worker, exc)
            self.save(status="did not finish", dnf_at=str(exc))
        except Exception as exc:  # noqa: BLE001 - recorded as the result
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
            if time.monotonic() > self.deadline - 5:  # a call cut short by its deadline-bounded timeout
                logger.warning("%s %s: deadline reached in %s (%s)", self.engine, self.args.worker,
                               self.result.get("stage"), why)
                self.save(status="did not finish", dnf_at=f"{self.result.get('stage')} (call timed out at the "
                          f"deadline: {why[:200]})")
            else:
                logger.exception("%s %s failed", self.engine, self.args.worker)
                self.save(status="error", error=why)
        finally:
            if self.server is not None:
                self.server.kill()

    # -- read the demo's Lite file ---------------------------------------------------------------

    def read(self) -> None:
        import numpy as np
        from tqdm import tqdm

        path = Path(self.args.read_path)
        self.engine = "lite25"
        self.server = Server("lite25", Path(self.args.venv_dir), path.parent, self.work / "server.pgids", db_file=path)
        self.server.start()
        self.server.wait_ready(120)
        client = self.client()
        collection = "products"
        fields = {f["name"]: f for f in client.describe_collection(collection, timeout=60)["fields"]}
        vector = "embedding" if "embedding" in fields else next(
            n for n, f in fields.items() if "FLOAT_VECTOR" in str(f.get("type")) and "SPARSE" not in str(f["type"]))
        wanted = [f for f in ("product_id", vector, "text") if f in fields]
        client.load_collection(collection, timeout=300)
        ids, vectors, texts = [], [], []
        iterator = client.query_iterator(collection, batch_size=2000, filter="", output_fields=wanted, timeout=120)
        with tqdm(desc="reading the demo collection", unit="row") as bar:
            while rows := iterator.next():
                for r in rows:
                    ids.append(str(r.get("product_id")))
                    vectors.append(r[vector])
                    texts.append(r.get("text"))
                bar.update(len(rows))
        iterator.close()
        client.close()
        order = sorted(range(len(ids)), key=lambda i: ids[i])
        ids = [ids[i] for i in order]
        texts = [texts[i] for i in order]
        base = np.asarray([vectors[i] for i in order], dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        from_catalog = "text" not in fields
        if from_catalog:
            cat_ids, cat_texts = catalog_texts()
            lookup = dict(zip(cat_ids, cat_texts))
            texts = [lookup.get(i, "") for i in ids]
        np.save(self.work / "read-vectors.npy", base)
        self.save(ids=ids, texts=texts, collection=f"{collection}.{vector} ({base.shape[1]}-d, {len(ids)} rows)",
                  read_by="Milvus Lite 2.5.1 served over TCP, query_iterator", text_from_catalog=from_catalog)

    # -- capabilities ---------------------------------------------------------------------------

    def caps(self) -> None:
        import numpy as np
        from pymilvus import AnnSearchRequest, DataType, Function, FunctionType, RRFRanker

        self.save(stage="server start")
        start_s = self.start_server(self.work / "data")
        client = self.client()
        try:
            version = client.get_server_version(timeout=10)
        except Exception as exc:  # noqa: BLE001
            version = f"not answered ({type(exc).__name__})"
        self.save(server_start_s=start_s, server_version=version, stage="basic")
        rng = np.random.default_rng(0)
        caps, errors = {}, {}

        def probe(name, fn):
            self.check(name)
            try:
                caps[name] = bool(fn())
            except Exception as exc:  # noqa: BLE001 - the answer is "no", with why
                caps[name] = False
                errors[name] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            logger.info("%s %s: %s %s", self.engine, name, caps[name], errors.get(name, ""))
            self.save(caps=caps, cap_errors=errors)

        colours = ['a"b', "red"]
        toy = rng.normal(size=(200, 8))
        toy /= np.linalg.norm(toy, axis=1, keepdims=True)  # unit vectors: each is its own best IP match
        rows = [{"id": i, "v": v, "colour": colours[i % 2]} for i, v in enumerate(toy.tolist())]

        def basic():
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
            schema.add_field("colour", DataType.VARCHAR, max_length=64)
            index = client.prepare_index_params()
            index.add_index(field_name="v", index_type="FLAT", metric_type=METRIC)
            client.create_collection("probe", schema=schema, index_params=index, timeout=self.t(120))
            client.insert("probe", rows, timeout=self.t(60))
            client.flush("probe", timeout=self.t(120))
            client.load_collection("probe", timeout=self.t(300))
            hits = client.search("probe", data=[rows[0]["v"]], anns_field="v", limit=3, timeout=self.t(60),
                                 search_params={"metric_type": METRIC, "params": {}})[0]
            count = client.query("probe", filter="", output_fields=["count(*)"], consistency_level="Strong",
                                 timeout=self.t(60))[0]["count(*)"]
            caps["basic_answer"] = f"top ids {[h['id'] for h in hits]}, count(*) {count}"
            return len(hits) == 3 and hits[0]["id"] == 0 and count == 200

        probe("basic", basic)
        if not caps["basic"]:
            why = errors.get("basic") or caps.get("basic_answer")
            self.save(status="error", error=f"basic create/insert/search failed: {why}", client_incompatible=True)
            return

        def filter_templates():
            hits = client.search("probe", data=[rows[1]["v"]], anns_field="v", limit=10, output_fields=["colour"],
                                 filter="colour == {c}", filter_params={"c": 'a"b'}, timeout=self.t(15),
                                 search_params={"metric_type": METRIC, "params": {}})[0]
            return len(hits) > 0 and all(h["entity"]["colour"] == 'a"b' for h in hits)

        probe("filter_templates", filter_templates)

        def hnsw():
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
            index = client.prepare_index_params()
            index.add_index(field_name="v", index_type="HNSW", metric_type=METRIC, params=HNSW_BUILD)
            client.create_collection("probe_hnsw", schema=schema, index_params=index, timeout=self.t(120))
            names = client.list_indexes("probe_hnsw", timeout=self.t(30))
            info = client.describe_index("probe_hnsw", index_name=names[0] if names else "v", timeout=self.t(30))
            caps["hnsw_describe"] = str(info.get("index_type"))
            client.insert("probe_hnsw", [{"id": r["id"], "v": r["v"]} for r in rows], timeout=self.t(60))
            client.flush("probe_hnsw", timeout=self.t(120))
            client.load_collection("probe_hnsw", timeout=self.t(300))
            hits = client.search("probe_hnsw", data=[rows[5]["v"]], anns_field="v", limit=3, timeout=self.t(60),
                                 search_params={"metric_type": METRIC, "params": {"ef": 64}})[0]
            return info.get("index_type") == "HNSW" and len(hits) == 3

        probe("hnsw", hnsw)

        def aliases():
            other = "probe_hnsw" if client.has_collection("probe_hnsw", timeout=self.t(30)) else None
            client.create_alias("probe", "probe_alias", timeout=self.t(30))
            first = client.describe_alias("probe_alias", timeout=self.t(30))
            ok = first.get("collection_name") == "probe"
            if other:
                client.alter_alias(other, "probe_alias", timeout=self.t(30))
                ok = ok and client.describe_alias("probe_alias", timeout=self.t(30)).get("collection_name") == other
            client.drop_alias("probe_alias", timeout=self.t(30))
            return ok

        probe("aliases", aliases)

        def alter_properties():
            client.alter_collection_properties("probe", properties={"collection.ttl.seconds": 86400},
                                               timeout=self.t(30))
            props = client.describe_collection("probe", timeout=self.t(30)).get("properties", {})
            caps["alter_properties_seen"] = str(props)[:200]
            return True

        probe("alter_properties", alter_properties)

        def rename():
            client.create_collection("probe_old", dimension=8, timeout=self.t(120))
            client.rename_collection("probe_old", "probe_new", timeout=self.t(30))
            return client.has_collection("probe_new", timeout=self.t(30)) and not client.has_collection(
                "probe_old", timeout=self.t(30))

        probe("rename_collection", rename)

        texts = [f"shirt model FS45{i:02d} red cotton" if i % 7 else f"watch EF-503L-{i} steel" for i in range(100)]

        def bm25():
            schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=8)
            schema.add_field("text", DataType.VARCHAR, max_length=512, enable_analyzer=True)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                         output_field_names=["sparse"]))
            index = client.prepare_index_params()
            index.add_index(field_name="v", index_type="FLAT", metric_type=METRIC)
            index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            client.create_collection("probe_bm25", schema=schema, index_params=index, timeout=self.t(120))
            client.insert("probe_bm25", [{"id": i, "v": rows[i]["v"], "text": t} for i, t in enumerate(texts)],
                          timeout=self.t(60))
            client.flush("probe_bm25", timeout=self.t(120))
            client.load_collection("probe_bm25", timeout=self.t(300))
            hits = client.search("probe_bm25", data=["FS4513"], anns_field="sparse", limit=3, timeout=self.t(60),
                                 search_params={"metric_type": "BM25"})[0]
            caps["bm25_score_sign"] = "negative" if hits and hits[0]["distance"] < 0 else "positive"
            return len(hits) > 0 and hits[0]["id"] == 13

        probe("bm25", bm25)

        def hybrid():
            if caps["bm25"]:
                reqs = [AnnSearchRequest([rows[3]["v"]], "v", {"metric_type": METRIC, "params": {}}, 10),
                        AnnSearchRequest(["FS4513"], "sparse", {"metric_type": "BM25"}, 10)]
                hits = client.hybrid_search("probe_bm25", reqs, RRFRanker(60), limit=5, timeout=self.t(60))[0]
                caps["hybrid_with"] = "dense + BM25"
            else:
                reqs = [AnnSearchRequest([rows[3]["v"]], "v", {"metric_type": METRIC, "params": {}}, 10),
                        AnnSearchRequest([rows[4]["v"]], "v", {"metric_type": METRIC, "params": {}}, 10)]
                hits = client.hybrid_search("probe", reqs, RRFRanker(60), limit=5, timeout=self.t(60))[0]
                caps["hybrid_with"] = "dense + dense (no BM25)"
            return len(hits) > 0

        probe("hybrid_rrf", hybrid)
        client.close()
        self.save(stage="done")

    # -- one size ---------------------------------------------------------------------------------

    def size(self, n: int) -> None:
        import numpy as np
        from pymilvus import DataType, Function, FunctionType
        from tqdm import tqdm

        args = self.args
        data = Path(args.data_dir)
        caps = json.loads(args.caps)
        base = np.load(data / "base.npy")
        queries = np.load(data / "queries.npy")
        self.save(stage="vectors", rows_target=n)
        vectors = grow(base, n, args.sigma)
        with_text = bool(caps.get("bm25")) and n <= len(base)
        texts = json.loads((data / "texts.json").read_text())["texts"] if with_text else None
        bm25_queries = json.loads((data / "bm25.json").read_text()) if with_text else []
        started = time.perf_counter()
        truth = exact_top(queries, vectors, 100)
        self.save(truth_s=time.perf_counter() - started, with_text=with_text)
        self.check("truth")
        if caps.get("hnsw"):
            index_type, build, search = "HNSW", dict(HNSW_BUILD), {}
        else:
            index_type = args.fallback_index
            build, search = FALLBACK_INDEXES[index_type]
        self.save(index=index_type, build_params=build, stage="server start")
        self.save(server_start_s=self.start_server(self.work / "data"), stage="create")
        client = self.client()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(vectors.shape[1]))
        if with_text:
            schema.add_field("text", DataType.VARCHAR, max_length=2048, enable_analyzer=True,
                             analyzer_params=ANALYZER)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["text"],
                                         output_field_names=["sparse"]))
        client.create_collection("bench", schema=schema, timeout=self.t(120))
        self.save(stage="insert")
        inserted, started = 0, time.perf_counter()
        try:
            for start in tqdm(range(0, n, args.batch), desc=f"{self.engine} insert {n:,}", unit="batch"):
                self.check(f"insert, {inserted:,} of {n:,} rows acknowledged")
                chunk = vectors[start:start + args.batch].tolist()
                rows = [{"id": start + i, "vector": v} for i, v in enumerate(chunk)]
                if with_text:
                    for i, row in enumerate(rows):
                        row["text"] = (texts[start + i] or "")[:2000]
                client.insert("bench", rows, timeout=self.t(300))
                inserted += len(rows)
                if inserted % (args.batch * 10) == 0:
                    elapsed = time.perf_counter() - started
                    self.save(rows_inserted=inserted, insert_s=elapsed, insert_rows_per_s=inserted / elapsed)
        finally:
            elapsed = time.perf_counter() - started
            self.save(rows_inserted=inserted, insert_s=elapsed, insert_rows_per_s=inserted / max(elapsed, 1e-9))
        self.save(stage="flush")
        started = time.perf_counter()
        client.flush("bench", timeout=self.remaining())
        self.save(flush_s=time.perf_counter() - started, stage="index build")
        started = time.perf_counter()
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type=METRIC, params=build)
        if with_text:
            index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        client.create_index("bench", index, timeout=self.remaining())  # waits for the build
        progress = self.wait_index(client)
        self.save(index_build_s=time.perf_counter() - started, index_progress=progress, stage="load")
        started = time.perf_counter()
        client.load_collection("bench", timeout=self.remaining())
        self.save(load_s=time.perf_counter() - started, stage="first search")
        started = time.perf_counter()
        client.search("bench", data=[queries[0].tolist()], anns_field="vector", limit=10, timeout=self.t(600),
                      search_params={"metric_type": METRIC,
                                     "params": search | ({"ef": 64} if index_type == "HNSW" else {})})
        self.save(first_search_s=time.perf_counter() - started, stage="count")
        count = client.query("bench", filter="", output_fields=["count(*)"], consistency_level="Strong",
                             timeout=self.t(300))[0]["count(*)"]
        names = client.list_indexes("bench", timeout=self.t(30))
        described = {name: str(client.describe_index("bench", index_name=name, timeout=self.t(30)).get("index_type"))
                     for name in names}
        client.close()
        self.save(rows_visible=count, index_described=described, points={})
        qlist = [q.tolist() for q in queries]
        for k in (10, 100):
            params = {"metric_type": METRIC, "params": search | ({"ef": max(64, k)} if index_type == "HNSW" else {})}
            for c in (1, 16):
                self.save(stage=f"dense top-{k} c={c}")
                point = self.load_point(lambda cl, q, k=k, p=params: cl.search(
                    "bench", data=[q], anns_field="vector", limit=k, search_params=p, timeout=self.t(60)),
                    qlist, c, passes=1 if c == 1 else 2)
                if c == 1 and point.pop("hits", None) is not None:
                    found = point["ids"]
                    recall = [len(set(f) & set(truth[i, :k].tolist())) / k for i, f in found.items()]
                    point[f"recall@{k}"] = float(np.mean(recall)) if recall else None
                point.pop("ids", None)
                self.result["points"][f"dense_top{k}_c{c}"] = point
                self.save()
        if with_text:
            bm = {"metric_type": "BM25"}
            for c in (1, 16):
                self.save(stage=f"bm25 top-100 c={c}")
                point = self.load_point(lambda cl, q: cl.search("bench", data=[q], anns_field="sparse", limit=100,
                                                                search_params=bm, timeout=self.t(60)),
                                        bm25_queries, c, passes=1 if c == 1 else 2)
                point.pop("ids", None)
                point.pop("hits", None)
                self.result["points"][f"bm25_top100_c{c}"] = point
                self.save()
        self.save(stage="done")

    def wait_index(self, client) -> dict:
        """Poll describe_index until every row is indexed (where the engine reports progress)."""
        last: dict = {}
        while True:
            pending = False
            for name in client.list_indexes("bench", timeout=self.t(30)):
                info = client.describe_index("bench", index_name=name, timeout=self.t(30))
                last[name] = {k: info.get(k) for k in ("index_type", "state", "indexed_rows", "total_rows",
                                                       "pending_index_rows") if k in info}
                if info.get("pending_index_rows") or (info.get("total_rows") and
                                                      (info.get("indexed_rows") or 0) < info["total_rows"]):
                    pending = True
                if str(info.get("state", "")).lower() in ("inprogress", "unissued"):
                    pending = True
            if not pending:
                return last
            self.save(index_progress=last)
            self.check(f"index build: {json.dumps(last)}")
            time.sleep(2)

    def load_point(self, call, queries: list, concurrency: int, passes: int) -> dict:
        """Run every query (`passes` times at c>1) from `concurrency` threads, each with its own MilvusClient.
        Stops early at --point-seconds; records latencies, queries/s and (c=1) the ids returned."""
        from tqdm import tqdm

        clients = [self.client() for _ in range(concurrency)]
        for q in queries[:5]:
            call(clients[0], q)
        jobs = list(range(len(queries))) * passes
        lock, latencies, ids, errors = threading.Lock(), [], {}, []
        cursor = iter(jobs)
        stop_at = time.monotonic() + self.args.point_seconds
        bar = tqdm(total=len(jobs), desc=f"{self.engine} c={concurrency}", unit="q", leave=False)

        def loop(client):
            while time.monotonic() < min(stop_at, self.deadline):
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    hits = call(client, queries[i])[0]
                except Exception as exc:  # noqa: BLE001 - counted
                    with lock:
                        errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                with lock:
                    latencies.append(ms)
                    if concurrency == 1:
                        ids[i] = [h["id"] for h in hits]
                    bar.update(1)

        threads = [threading.Thread(target=loop, args=(cl,), daemon=True) for cl in clients]
        started = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - started
        bar.close()
        for cl in clients:
            cl.close()
        import numpy as np

        lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
        point = {"concurrency": concurrency, "requests": len(jobs), "answered": len(latencies),
                 "errors": len(errors), "first_errors": errors[:3], "wall_s": wall,
                 "qps": len(latencies) / wall if wall else None, "p50_ms": float(np.percentile(lat, 50)),
                 "p99_ms": float(np.percentile(lat, 99)), "complete": len(latencies) == len(jobs),
                 "ids": ids, "hits": True}
        self.check(f"search point c={concurrency}")
        return point

    # -- restart and recover after kill -9 ---------------------------------------------------------------

    def recover(self) -> None:
        import numpy as np
        from pymilvus import DataType
        from tqdm import tqdm

        args, caps = self.args, json.loads(self.args.caps)
        rng = np.random.default_rng(7)
        vectors = rng.normal(size=(args.recover_rows, 64)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index_type = "HNSW" if caps.get("hnsw") else args.fallback_index
        build, search = (HNSW_BUILD, {"ef": 64}) if index_type == "HNSW" else FALLBACK_INDEXES[index_type]
        self.save(stage="server start", index=index_type, rows_target=args.recover_rows)
        self.start_server(self.work / "data")
        port = self.server.port
        client = self.client()
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=64)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type=METRIC, params=build)
        client.create_collection("recover", schema=schema, index_params=index, timeout=self.t(120))
        acked = 0
        self.save(stage="insert")
        for start in tqdm(range(0, args.recover_rows, 1000), desc=f"{self.engine} insert before kill -9", unit="batch"):
            self.check(f"insert before kill, {acked} acknowledged")
            rows = [{"id": start + i, "vector": v} for i, v in enumerate(vectors[start:start + 1000].tolist())]
            client.insert("recover", rows, timeout=self.t(120))
            acked += len(rows)
        client.close()
        self.save(rows_acked=acked, stage="kill -9")
        logger.info("%s: %d rows acknowledged; kill -9 of the server's process group", self.engine, acked)
        self.server.kill()
        time.sleep(1)
        self.save(stage="restart")
        restarted = time.perf_counter()
        self.server = Server(self.engine, Path(args.venv_dir), self.work / "data", self.work / "server.pgids", port)
        self.server.start()
        self.server.wait_ready(min(300, self.remaining()))
        ready_s = time.perf_counter() - restarted
        self.save(server_answers_s=ready_s, stage="first search after restart")
        from pymilvus import MilvusClient

        attempts, last_error, loaded = 0, None, False
        while True:
            self.check(f"first search after restart (last error: {last_error})")
            attempts += 1
            try:
                client = MilvusClient(uri=self.server.uri, timeout=5)
                try:
                    client.search("recover", data=[vectors[0].tolist()], anns_field="vector", limit=10, timeout=10,
                                  search_params={"metric_type": METRIC, "params": search})
                finally:
                    client.close()
                break
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
                if "load" in last_error.lower() and not loaded:
                    client = MilvusClient(uri=self.server.uri, timeout=5)
                    try:
                        client.load_collection("recover", timeout=self.t(300))
                        loaded = True
                    except Exception as load_exc:  # noqa: BLE001
                        last_error = f"load_collection: {type(load_exc).__name__}: {str(load_exc)[:200]}"
                    finally:
                        client.close()
                else:
                    time.sleep(0.5)
        answer_s = time.perf_counter() - restarted
        client = self.client()
        count = client.query("recover", filter="", output_fields=["count(*)"], consistency_level="Strong",
                             timeout=self.t(120))[0]["count(*)"]
        client.close()
        self.save(first_answer_s=answer_s, search_attempts=attempts, needed_load=loaded, last_error=last_error,
                  rows_kept=int(count), stage="done")


# ----------------------------------------------------------------------------------------------------
# orchestration


def run_worker(args, task: str, client: str, out: Path, extra: list[str] | None = None,
               timeout_s: float | None = None) -> dict:
    """Run one worker task with the given client venv; kill every server group it started afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    pgid_file = out.parent / "server.pgids"
    cmd = [str(venv_python(Path(args.venv_dir), client)), str(Path(__file__).resolve()), "--worker", task,
           "--worker-out", str(out), "--venv-dir", str(args.venv_dir), "--deadline-min", str(args.deadline_min),
           "--batch", str(args.batch), "--point-seconds", str(args.point_seconds), "--sigma", str(args.sigma),
           "--fallback-index", args.fallback_index, "--recover-rows", str(args.recover_rows), *(extra or [])]
    timeout_s = timeout_s or args.deadline_min * 60 + 120
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("worker %s overran its deadline: killing it", task)
        kill_group(proc.pid)
        proc.wait()
    finally:
        if pgid_file.exists():
            for line in pgid_file.read_text().split():
                kill_group(int(line))
            pgid_file.unlink()
    result = json.loads(out.read_text()) if out.exists() else {"status": "error", "error": "worker wrote nothing"}
    if proc.returncode and result.get("status") in ("running", None):
        began = (result.get("stage_started_s") or {}).get(result.get("stage"))
        since = f", {args.deadline_min * 60 + 120 - began:.0f} s into it" if began is not None else ""
        result.update(status="did not finish", dnf_at=f"killed {args.deadline_min:g} min + 2 min after start, "
                      f"in stage {result.get('stage')}{since}")
    return result


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
        info["mem_gib"] = round(int(next(line.split()[1] for line in open("/proc/meminfo")
                                         if line.startswith("MemTotal"))) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def busy_processes() -> list[str]:
    """The top CPU users right now (to show what shared the cores)."""
    out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return [" ".join(line.split()) for line in out.splitlines()[1:6]]


def orchestrate(args) -> None:
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    source = args.vectors
    if source == "auto":
        source = f"lite:{DEMO_DB}" if DEMO_DB.exists() and DEMO_DONE.exists() else "synthetic"
    meta = prepare_data(args, cache, source)
    logger.info("data: %s", meta["origin"])
    out_json = Path(args.out) / "milvus_engines.json"
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict = {}
    if args.merge and out_json.exists():
        results = json.loads(out_json.read_text())
    command = "python bench/milvus_engines.py " + " ".join(shlex.quote(a) for a in args.argv)
    data = {k: v for k, v in meta.items() if k not in ("dir", "query_products")}
    if results.get("data", data)["origin"] != data["origin"]:
        data["other_runs"] = sorted({results["data"]["origin"], *results["data"].get("other_runs", [])})
    kept_sizes = {int(k) for e in results.get("engines", {}).values() for k in (e.get("sizes") or {})}
    results.update({
        "command": command, "commands": [*results.get("commands", []), command],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "shared_cores_note": SHARED_NOTE,
        "data": data,
        "settings": {"sizes": sorted(kept_sizes | set(sizes)), "batch": args.batch, "deadline_min": args.deadline_min,
                     "point_seconds": args.point_seconds, "sigma": args.sigma, "metric": METRIC,
                     "hnsw": HNSW_BUILD | {"ef": "max(64, k)"}, "fallback_index": args.fallback_index,
                     "fallback_params": FALLBACK_INDEXES[args.fallback_index],
                     "recover_rows": args.recover_rows, "concurrency": [1, 16],
                     "passes": {"c=1": 1, "c=16": 2}, "lite3_server_max_workers": 16,
                     "servers": "each on 127.0.0.1 in its own process group; data dirs fresh per size"},
    })
    results.setdefault("engines", {})

    def write():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1, default=str))
        render(out_json)

    for engine in args.engines.split(","):
        ensure_venv(Path(args.venv_dir), engine)
        entry = results["engines"].setdefault(engine, {})
        entry.pop("client_fallback_reason", None)
        entry.update(label=ENGINES[engine]["label"], sizes=entry.get("sizes") or {},
                     version=package_version(venv_python(Path(args.venv_dir), engine), ENGINES[engine]["package"]))
        work = cache / "work" / engine
        shutil.rmtree(work, ignore_errors=True)
        client = args.client or "client"
        logger.info("== %s: capabilities (%s)", engine, CLIENTS[client])
        caps = run_worker(args, "caps", client, work / "caps" / "result.json", ["--worker-engine", engine],
                          timeout_s=900)
        if caps.get("client_incompatible") and not args.client:
            logger.warning("%s: %s cannot drive it (%s); using %s", engine, CLIENTS[client], caps.get("error"),
                           CLIENTS["client26"])
            entry["client_fallback_reason"] = f"{CLIENTS[client]}: {caps.get('error')}"
            client = "client26"
            ensure_venv(Path(args.venv_dir), client)
            caps = run_worker(args, "caps", client, work / "caps26" / "result.json", ["--worker-engine", engine],
                              timeout_s=900)
        entry.update(client=caps.get("client", CLIENTS[client]), caps=caps)
        write()
        cap_flags = json.dumps({k: caps.get("caps", {}).get(k) for k in ("bm25", "hnsw")})
        for size in sizes:
            logger.info("== %s: %d rows", engine, size)
            load = {"load_before": os.getloadavg(), "busy_before": busy_processes()}
            row = run_worker(args, "size", client, work / f"size-{size}" / "result.json",
                             ["--worker-engine", engine, "--size", str(size), "--data-dir", meta["dir"],
                              "--caps", cap_flags])
            entry["sizes"][str(size)] = row | load | {"load_after": os.getloadavg(), "data_origin": meta["origin"]}
            write()
        if not args.skip_recover:
            logger.info("== %s: kill -9 and recover", engine)
            entry["recovery"] = run_worker(args, "recover", client, work / "recover" / "result.json",
                                           ["--worker-engine", engine, "--caps", cap_flags])
            write()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write()
    logger.info("wrote %s and .md/.png", out_json)


# ----------------------------------------------------------------------------------------------------
# rendering


def _fmt(value, spec: str = ".0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _point(size_row: dict, name: str) -> dict:
    return (size_row.get("points") or {}).get(name) or {}


def _size_cells(row: dict | None, has_bm25: bool) -> list[str]:
    if not row:
        return ["-"] * (5 if has_bm25 else 4)
    status = row.get("status")
    ins = f"{_fmt(row.get('insert_rows_per_s'))}" if row.get("rows_inserted") else "-"
    d1, d16 = _point(row, "dense_top10_c1"), _point(row, "dense_top10_c16")
    if status != "ok" and not d1:
        why = "DNF" if status == "did not finish" else "error"
        detail = row.get("dnf_at") or row.get("error") or ""
        cells = [ins, f"{why}: {detail[:90]}", "-", "-"] + (["-"] if has_bm25 else [])
        return cells
    lat = f"{_fmt(d1.get('p50_ms'), '.1f')} / {_fmt(d1.get('p99_ms'), '.1f')}"
    qps = f"{_fmt(d1.get('qps'))} / {_fmt(d16.get('qps'))}"
    recall = _fmt(d1.get("recall@10"), ".3f")
    cells = [ins, lat, qps, recall]
    if has_bm25:
        b1, b16 = _point(row, "bm25_top100_c1"), _point(row, "bm25_top100_c16")
        cells.append(f"{_fmt(b1.get('qps'))} / {_fmt(b16.get('qps'))}" if b1 else "no BM25")
    if status != "ok":
        cells[1] += f" ({status}: {(row.get('dnf_at') or row.get('error') or '')[:60]})"
    return cells


def _yn(caps: dict, key: str) -> str:
    value = caps.get(key)
    return "?" if value is None else ("yes" if value else "no")


def render(json_path: Path) -> None:
    results = json.loads(Path(json_path).read_text())
    sizes = results["settings"]["sizes"]
    base_rows = results["data"]["rows"]
    engines = results.get("engines", {})
    head = ["engine", "client", "BM25", "hybrid", "aliases", "HNSW", "index used"]
    for size in sizes:
        s = f"{size:,}"
        origins = {r["data_origin"] for e in engines.values() for k, r in (e.get("sizes") or {}).items()
                   if k == str(size) and r.get("data_origin")}
        if len(origins) == 1 and next(iter(origins)) != results["data"]["origin"]:
            s += " (" + next(iter(origins)).split(":")[0] + " vectors)"
        head += [f"insert rows/s {s}", f"dense top-10 p50/p99 ms c=1 {s}", f"dense q/s c=1 / c=16 {s}",
                 f"recall@10 {s}"]
        if size <= base_rows:
            head.append(f"BM25 top-100 q/s c=1 / c=16 {s}")
    head.append("kill -9: s to first answer, rows kept/acked")
    lines = [f"# Milvus engines as a shared index server ({results['machine'].get('cpus')} cores, no Docker)", "",
             f"Data: {results['data']['origin']}; {results['data']['rows']:,} base rows, "
             f"{results['data']['dim']}-d; larger sizes add perturbed copies (sigma {results['settings']['sigma']}). "
             f"Dense queries: {results['data']['dense_queries']} perturbed copies of products (sigma "
             f"{results['data']['query_sigma']}), not in the collection; BM25 queries: "
             f"{results['data']['bm25_queries']} from {', '.join(results['data']['bm25_sets'])}. Metric IP; HNSW "
             f"M {HNSW_BUILD['M']} efConstruction {HNSW_BUILD['efConstruction']} ef max(64, k) where the engine has "
             f"it, else {results['settings']['fallback_index']} {results['settings']['fallback_params']}. "
             f"Each engine ran alone as a server; one client process, c=16 is 16 threads with a MilvusClient each. "
             f"Deadline {results['settings']['deadline_min']} min per engine and size (DNF = did not finish).", "",
             f"**Noise:** {results['shared_cores_note']}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in engines.items():
        caps = (e.get("caps") or {}).get("caps", {})
        rows = [r for r in (e.get("sizes") or {}).values()]
        index_used = next((r.get("index") for r in rows if r.get("index")), "-")
        if index_used == "HNSW" or index_used == "-":
            pass
        elif caps.get("hnsw_describe"):
            index_used += f" (HNSW: describe says {caps['hnsw_describe']})"
        client = e.get("client", "?") + (" (fallback)" if e.get("client_fallback_reason") else "")
        cells = [f"{name}: {e.get('label', '')}" + ("" if e.get("version") in e.get("label", "") else
                                                     f" (installed {e.get('version')})"), client, _yn(caps, "bm25"),
                 _yn(caps, "hybrid_rrf"), _yn(caps, "aliases"), _yn(caps, "hnsw"), index_used]
        if (e.get("caps") or {}).get("status") not in ("ok", None):
            cells[2] += f" (probe {e['caps'].get('status')}: {str(e['caps'].get('error'))[:80]})"
        for size in sizes:
            cells += _size_cells((e.get("sizes") or {}).get(str(size)), size <= base_rows)
        rec = e.get("recovery") or {}
        if rec.get("rows_kept") is not None:
            cells.append(f"{rec['first_answer_s']:.1f} s, {rec['rows_kept']:,}/{rec['rows_acked']:,}")
        elif rec:
            cells.append(f"{rec.get('status')}: {(rec.get('dnf_at') or rec.get('error') or '')[:80]}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", "## Details", "",
              "| engine | size | status | insert s | flush s | index build s | load s | first search s | "
              "top-10 q/s c=1/16 | top-100 p50 ms c=1 | top-100 q/s c=1/16 | recall@100 | BM25 p50/p99 ms c=1 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in engines.items():
        for size, r in sorted((e.get("sizes") or {}).items(), key=lambda kv: int(kv[0])):
            d1, d16 = _point(r, "dense_top10_c1"), _point(r, "dense_top10_c16")
            h1, h16 = _point(r, "dense_top100_c1"), _point(r, "dense_top100_c16")
            b1 = _point(r, "bm25_top100_c1")
            status = r.get("status", "?")
            if status != "ok":
                status += f" ({(r.get('dnf_at') or r.get('error') or '')[:100]})"
            lines.append(
                f"| {name} | {int(size):,} | {status} | {_fmt(r.get('insert_s'), '.1f')} "
                f"({r.get('rows_inserted', 0):,} rows) | {_fmt(r.get('flush_s'), '.1f')} | "
                f"{_fmt(r.get('index_build_s'), '.1f')} | {_fmt(r.get('load_s'), '.1f')} | "
                f"{_fmt(r.get('first_search_s'), '.2f')} | {_fmt(d1.get('qps'))} / {_fmt(d16.get('qps'))} | "
                f"{_fmt(h1.get('p50_ms'), '.1f')} | {_fmt(h1.get('qps'))} / {_fmt(h16.get('qps'))} | "
                f"{_fmt(h1.get('recall@100'), '.3f')} | "
                f"{_fmt(b1.get('p50_ms'), '.1f')} / {_fmt(b1.get('p99_ms'), '.1f')} |".replace("\n", " "))
    lines += ["", "## Capabilities (probed by real calls on a toy collection)", "",
              "| engine | server version | filter templates | rename_collection | alter_collection_properties | "
              "BM25 score sign | hybrid with | errors (no answers) |", "|---|---|---|---|---|---|---|---|"]
    for name, e in engines.items():
        c = e.get("caps") or {}
        caps = c.get("caps", {})
        errs = "; ".join(f"{k}: {v[:120]}" for k, v in (c.get("cap_errors") or {}).items()).replace("|", "/")
        lines.append(f"| {name} | {str(c.get('server_version', '?'))[:60]} | {_yn(caps, 'filter_templates')} | "
                     f"{_yn(caps, 'rename_collection')} | {_yn(caps, 'alter_properties')} | "
                     f"{caps.get('bm25_score_sign', '-')} | {caps.get('hybrid_with', '-')} | {errs or '-'} |")
    fallbacks = [f"{n}: {e['client_fallback_reason']}" for n, e in engines.items() if e.get("client_fallback_reason")]
    if fallbacks:
        lines += ["", "Client fallbacks: " + "; ".join(fallbacks)]
    lines += ["", "## Recovery after kill -9", "",
              "Insert rows (acknowledged, no flush), kill -9 the server's process group, restart on the same data; "
              "time from restart to the first answered search, then count(*) with Strong consistency.", "",
              "| engine | rows acked | rows kept | s until the server answers | s until a search answers | "
              "needed load_collection | status |", "|---|---|---|---|---|---|---|"]
    for name, e in engines.items():
        r = e.get("recovery") or {}
        lines.append(f"| {name} | {r.get('rows_acked', '-')} | {r.get('rows_kept', '-')} | "
                     f"{_fmt(r.get('server_answers_s'), '.1f')} | {_fmt(r.get('first_answer_s'), '.1f')} | "
                     f"{r.get('needed_load', '-')} | {r.get('status', '-')} "
                     f"{(r.get('dnf_at') or r.get('error') or '')[:120]} |".replace("|  |", "| |"))
    commands = results.get("commands") or [results["command"]]
    lines += ["", "## What it says", "", auto_summary(results)]
    if results.get("note"):
        lines += ["", results["note"]]
    if results["data"].get("other_runs"):
        lines += ["", "Sizes marked with another vector source came from an earlier run merged in: "
                  + "; ".join(results["data"]["other_runs"]) + "."]
    lines += ["", "## Command" + ("s (merged runs, in order)" if len(commands) > 1 else ""), "",
              *[f"`{c}`" for c in commands], "",
              f"Started {results.get('started')}, finished {results.get('finished', '(not finished)')}; machine: "
              f"{json.dumps(results['machine'])}."]
    Path(json_path).with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, Path(json_path).with_suffix(".png"))


def auto_summary(results: dict) -> str:
    """Sentences computed from the numbers: who is fastest per size, how each scales to c=16, what finished."""
    engines = results.get("engines", {})
    out = []
    for size in results["settings"]["sizes"]:
        rows = {n: (e.get("sizes") or {}).get(str(size)) or {} for n, e in engines.items()}
        done = {n: _point(r, "dense_top10_c1") for n, r in rows.items() if _point(r, "dense_top10_c1").get("qps")}
        unfinished = [f"{n} ({r.get('status')}: {(r.get('dnf_at') or r.get('error') or '')[:80]})"
                      for n, r in rows.items() if r and r.get("status") != "ok"]
        if done:
            best = max(done, key=lambda n: done[n]["qps"])
            parts = []
            for n in done:
                q16 = _point(rows[n], "dense_top10_c16").get("qps")
                scale = f", x{q16 / done[n]['qps']:.1f} at c=16" if q16 else ""
                parts.append(f"{n} {done[n]['qps']:.0f} q/s (recall@10 {_fmt(done[n].get('recall@10'), '.3f')}"
                             f"{scale})")
            out.append(f"At {size:,} rows, dense top-10 at c=1: " + "; ".join(parts) + f" - {best} is fastest.")
            ins = {n: r.get("insert_rows_per_s") for n, r in rows.items() if r.get("insert_rows_per_s")}
            if ins:
                out.append("Insert rows/s: " + ", ".join(f"{n} {v:.0f}" for n, v in ins.items()) + ".")
        if unfinished:
            out.append(f"At {size:,} rows not finished: " + "; ".join(unfinished) + ".")
    caps = {n: (e.get("caps") or {}).get("caps", {}) for n, e in engines.items()}
    full = [n for n, c in caps.items() if c.get("bm25") and c.get("aliases") and c.get("hnsw")]
    out.append("BM25 + aliases + HNSW together: " + (", ".join(full) if full else "no engine") + ".")
    recs = [f"{n} {r['rows_kept']:,}/{r['rows_acked']:,} rows after {r['first_answer_s']:.1f} s"
            for n, e in engines.items() if (r := e.get("recovery") or {}).get("rows_kept") is not None]
    if recs:
        out.append("After kill -9: " + "; ".join(recs) + ".")
    return " ".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["settings"]["sizes"]
    engines = list(results.get("engines", {}))
    series = [("dense_top10_c1", "dense top-10 c=1"), ("dense_top10_c16", "dense top-10 c=16"),
              ("bm25_top100_c1", "BM25 top-100 c=1"), ("bm25_top100_c16", "BM25 top-100 c=16")]
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes) + 1, 5), squeeze=False, layout="constrained")
    width = 0.8 / len(series)
    for ax, size in zip(axes[0], sizes):
        for j, (key, label) in enumerate(series):
            xs, ys = [], []
            for i, name in enumerate(engines):
                row = results["engines"][name].get("sizes", {}).get(str(size)) or {}
                qps = _point(row, key).get("qps")
                x = i + (j - (len(series) - 1) / 2) * width
                if qps is not None:
                    xs.append(x)
                    ys.append(qps)
                elif key == "dense_top10_c1":
                    ax.text(x, 0, "DNF" if row.get("status") == "did not finish" else "n/a", rotation=90,
                            ha="center", va="bottom", fontsize=8)
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(engines)), engines)
        ax.set_xlim(-0.5, len(engines) - 0.5)
        ax.set_title(f"{size:,} rows")
        ax.set_ylabel("queries/s (one client process)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Milvus engines: queries/s by engine, size, concurrency")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parts = __doc__.split("\n\n")
    p = argparse.ArgumentParser(description=parts[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(parts[1:]))
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated engines, from {', '.join(ENGINES)}")
    p.add_argument("--sizes", default="44072,1000000", help="comma-separated collection sizes (rows)")
    p.add_argument("--vectors", default="auto",
                   help="'lite:PATH' (a Milvus Lite 2.5.1 file with collection products; copied first), 'synthetic', "
                        "or 'auto' (lite:runs/milvus.db once runs/demo.done exists, else synthetic)")
    p.add_argument("--venv-dir", default=str(Path.home() / ".cache" / "mmsearch" / "milvus_engines" / "venvs"),
                   help="where the engine and client venvs live (created when missing)")
    p.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "milvus_engines"),
                   help="data cache, the copy of the Lite file and the servers' data directories")
    p.add_argument("--out", default=str(RESULTS), help="where milvus_engines.{json,md,png} go")
    p.add_argument("--client", choices=list(CLIENTS), default=None,
                   help="force one client venv for every engine (default: pymilvus 3, falling back to 2.6 per engine)")
    p.add_argument("--batch", type=int, default=5000, help="rows per insert call")
    p.add_argument("--queries", type=int, default=300, help="dense queries (perturbed held-out product vectors)")
    p.add_argument("--query-sigma", type=float, default=0.02, help="per-dimension noise of the dense queries")
    p.add_argument("--sigma", type=float, default=0.02, help="per-dimension noise of the copies that grow a size")
    p.add_argument("--deadline-min", type=float, default=15.0,
                   help="minutes per engine and size (then: did not finish)")
    p.add_argument("--point-seconds", type=float, default=60.0, help="cap on the seconds of one search measurement")
    p.add_argument("--fallback-index", choices=list(FALLBACK_INDEXES), default="IVF_FLAT",
                   help="index for an engine without HNSW")
    p.add_argument("--recover-rows", type=int, default=10000, help="rows inserted before the kill -9")
    p.add_argument("--skip-recover", action="store_true", help="skip the kill -9 recovery test")
    p.add_argument("--refresh-data", action="store_true", help="rebuild the cached vectors and queries")
    p.add_argument("--merge", action="store_true", help="keep engines already in the json that this run does not redo")
    p.add_argument("--keep-work", action="store_true", help="keep the servers' data directories after each engine")
    p.add_argument("--render", action="store_true", help="only re-render md/png from the json in --out")
    p.add_argument("--note", default=None, help="a paragraph stored in the json and shown under 'What it says'")
    p.add_argument("--log-level", default="INFO", help="logging level")
    g = p.add_argument_group("internal (one worker task; set by the orchestrator)")
    g.add_argument("--worker", choices=["read", "caps", "size", "recover"], default=None, help="run one worker task")
    g.add_argument("--worker-engine", default=None, help="engine the worker drives")
    g.add_argument("--worker-out", default=None, help="result file the worker writes after every stage")
    g.add_argument("--size", type=int, default=0, help="rows for a size task")
    g.add_argument("--data-dir", default=None, help="prepared data (npy/json) for a size task")
    g.add_argument("--caps", default="{}", help="json of the engine's probed bm25/hnsw capabilities")
    g.add_argument("--read-path", default=None, help="the copied Lite file a read task serves and reads")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def in_client_venv(args) -> bool:
    return Path(sys.prefix).resolve() in {(Path(args.venv_dir) / c).resolve() for c in CLIENTS}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # its own retries log every failed probe at ERROR
    if args.worker:
        Worker(args).run()
        return
    if not in_client_venv(args):
        python = ensure_venv(Path(args.venv_dir), args.client or "client")
        logger.info("re-running with %s", python)
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *args.argv])
    if args.render:
        path = Path(args.out) / "milvus_engines.json"
        if args.note is not None:
            path.write_text(json.dumps(json.loads(path.read_text()) | {"note": args.note}, indent=1))
        render(path)
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
