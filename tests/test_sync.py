"""Catalog sync against the real Triton and Milvus Lite: a re-run embeds only what changed, rewrites
rows whose other fields changed with their stored vector, deletes what left the catalog, and refuses
deletions when the catalog read looks partial."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from client import store
from client.index import Indexer

N = 40


@pytest.fixture()
def catalog(sample_csv, tmp_path):
    """A CSV catalog of N real products whose images are files in tmp_path (so a test can change them)."""
    df = pd.read_csv(sample_csv, dtype=str).iloc[:N].copy()
    images = tmp_path / "images"
    images.mkdir()
    for i, ref in enumerate(df.image_url):
        (images / f"{i}.jpg").write_bytes((sample_csv.parent / ref).read_bytes())
    df["image_url"] = [f"images/{i}.jpg" for i in range(N)]
    path = tmp_path / "catalog.csv"
    df.to_csv(path, index=False)
    return path, df


def vectors(client, ids) -> dict[str, np.ndarray]:
    return {pid: np.asarray(v) for pid, v in store.read_vectors(client, list(ids), "products").items()}


def test_sync_embeds_only_changes_and_deletes_what_left(triton, tmp_path, catalog):
    path, df = catalog
    client = store.connect(str(tmp_path / "sync.db"))
    indexer = Indexer(triton.grpc_url, "grpc", client, "products")
    first = indexer.run(str(path))
    assert (first.added, first.indexed, first.unchanged, first.deleted) == (N, N, 0, 0)

    again = indexer.run(str(path))  # nothing changed: nothing embedded, nothing written
    assert (again.added, again.changed, again.updated, again.deleted, again.indexed) == (0, 0, 0, 0, 0)
    assert again.unchanged == N

    ids = list(df.product_id)
    before = vectors(client, ids)
    df.loc[0, "title"] = df.title[0] + " limited edition"  # model input: re-embedded
    (tmp_path / "images" / "1.jpg").write_bytes((tmp_path / "images" / "7.jpg").read_bytes())  # new photo bytes
    df.loc[2, "price"] = "999.0"  # a stored field only: rewritten, vector kept
    gone = ids[3:5]
    new = pd.read_csv(path.parent / "catalog.csv", dtype=str).iloc[[5]].assign(product_id="new-1")
    changed = pd.concat([df.drop(index=[3, 4]), new], ignore_index=True)
    changed.to_csv(path, index=False)

    synced = indexer.run(str(path))
    assert (synced.added, synced.changed, synced.updated, synced.deleted) == (1, 2, 1, 2), synced.summary()
    assert synced.unchanged == N - 5 and synced.indexed == 3 and not synced.deletion_refused
    assert store.count(client, "products") == N - 2 + 1
    assert not client.get("products", ids=gone), "deleted products are still in the collection"
    after = vectors(client, ids[:3] + ["new-1"])
    assert not np.allclose(after[ids[0]], before[ids[0]]) and not np.allclose(after[ids[1]], before[ids[1]])
    np.testing.assert_array_equal(after[ids[2]], before[ids[2]])  # same vector, new price
    assert client.get("products", ids=[ids[2]], output_fields=["price"])[0]["price"] == pytest.approx(999.0)
    assert indexer.run(str(path)).unchanged == N - 1  # and the next night is quiet again


def test_a_partial_catalog_never_deletes(triton, tmp_path, catalog):
    path, df = catalog
    client = store.connect(str(tmp_path / "partial.db"))
    indexer = Indexer(triton.grpc_url, "grpc", client, "products")
    indexer.run(str(path))

    limited = indexer.run(str(path), limit=10)  # --limit reads part of the catalog
    assert limited.deleted == 0 and "--limit" in limited.deletion_refused

    df.iloc[:10].to_csv(path, index=False)  # a truncated file: 75% of the collection would go
    truncated = indexer.run(str(path))
    assert truncated.deleted == 0 and "30 of 40" in truncated.deletion_refused
    assert store.count(client, "products") == N

    with open(path, "a") as f:  # a malformed line: the catalog read is incomplete
        f.write('broken,"unterminated\n')
    assert "malformed" in indexer.run(str(path), max_delete_fraction=1.0).deletion_refused

    df.iloc[:10].to_csv(path, index=False)
    allowed = indexer.run(str(path), max_delete_fraction=1.0)
    assert allowed.deleted == N - 10 and store.count(client, "products") == 10
