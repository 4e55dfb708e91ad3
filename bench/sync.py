"""Catalog sync at the catalog's size: a full index, an unchanged re-run, and a 1%-changed re-run, in one run.

    python bench/sync.py --model-repository model_repository --catalog ../shared/data/fashion/catalog.parquet

The 1%-changed catalog is the real one with 1% of the products edited the ways a nightly feed
changes them, in equal parts: a new title (re-embedded), new photo bytes (re-embedded), a new price
(fields rewritten, vector kept), removed, and new products (copies under new ids). Milvus is a Lite
file in a temporary directory, or `--milvus-uri http://...` (a fresh collection there). Writes
bench/results/sync.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from client import store  # noqa: E402
from client.index import Indexer  # noqa: E402
from core.catalog import DEFAULT_CATALOG  # noqa: E402
from export.serve import TritonServer  # noqa: E402

logger = logging.getLogger("bench.sync")
RESULTS = ROOT / "bench" / "results"


def changed_catalog(src: Path, dst: Path, fraction: float, seed: int = 0) -> dict[str, int]:
    """A copy of the catalog with `fraction` of its products edited in five equal parts; returns the counts."""
    df = pd.read_parquet(src)
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(df), size=int(len(df) * fraction), replace=False)
    title, photo, price, gone, new = np.array_split(picked, 5)
    df.loc[df.index[title], "title"] = df.loc[df.index[title], "title"] + " (new season)"
    donors = rng.choice(len(df), size=len(photo))
    df.loc[df.index[photo], "image"] = df["image"].iloc[donors].values  # another product's photo bytes
    df.loc[df.index[price], "price"] = df.loc[df.index[price], "price"] * 1.1 + 1
    added = df.iloc[new].copy()
    added["product_id"] = "new-" + added["product_id"].astype(str)
    df = pd.concat([df.drop(index=df.index[gone]), added], ignore_index=True)
    df.to_parquet(dst)
    return {"title": len(title), "photo": len(photo), "price": len(price), "removed": len(gone), "added": len(new)}


def run(indexer: Indexer, catalog: str, label: str) -> dict:
    report = indexer.run(catalog, max_delete_fraction=0.05)
    logger.info("%s: %s", label, report.summary())
    return {"run": label, "seconds": round(report.seconds, 1), "added": report.added, "changed": report.changed,
            "updated": report.updated, "deleted": report.deleted, "unchanged": report.unchanged,
            "embedded": report.indexed, "failed": len(report.failed)}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-repository", default="model_repository", help="Triton model repository to serve")
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog (.parquet) to index and edit")
    p.add_argument("--milvus-uri", default=None, help="a Milvus server; default: a Lite file in a temp dir")
    p.add_argument("--fraction", type=float, default=0.01, help="fraction of the products the second run edits")
    p.add_argument("--out", type=Path, default=RESULTS / "sync", help="results prefix (.md and .json)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.milvus_uri or str(Path(tmp) / "sync.db")
        edited = Path(tmp) / "changed.parquet"
        edits = changed_catalog(Path(args.catalog), edited, args.fraction)
        server = TritonServer.on_free_ports(args.model_repository, log_file=Path(tmp) / "triton.log")
        server.start(timeout_s=300)
        try:
            client = store.connect(uri)
            collection = f"sync_bench_{int(time.time())}"
            indexer = Indexer(server.grpc_url, "grpc", client, collection)
            rows = [run(indexer, args.catalog, "full index"), run(indexer, args.catalog, "unchanged re-run"),
                    run(indexer, str(edited), f"{args.fraction:.0%} changed")]
            count = store.count(client, collection)
            client.drop_collection(collection)
        finally:
            server.stop()
    full = rows[0]["seconds"]
    result = {"milvus": "server" if args.milvus_uri else "Lite", "edits": edits, "runs": rows,
              "final_count": count, "ratios_to_full": {r["run"]: round(r["seconds"] / full, 3) for r in rows[1:]}}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Catalog sync: what a nightly re-run costs",
        "",
        f"`python bench/sync.py` on {len(pd.read_parquet(args.catalog, columns=['product_id']))} products, Milvus "
        f"{result['milvus']}, the served model through Triton (python flavour, 2 cores shared with other work). "
        f"The edited catalog changes {sum(edits.values())} products: {json.dumps(edits)}. One run, in order.",
        "",
        "| run | seconds | x full | embedded | added | changed | updated | deleted | unchanged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seconds']} | {r['seconds'] / full:.3f} | {r['embedded']} | {r['added']} | "
                     f"{r['changed']} | {r['updated']} | {r['deleted']} | {r['unchanged']} |")
    lines += ["", f"Rows at the end: {count}. The unchanged re-run embeds nothing: it reads the catalog, hashes every "
              "image's bytes, and compares digests with the collection's (one strong-consistency scan)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
