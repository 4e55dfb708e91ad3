"""client.sync's planning without Milvus or Triton: digests of real catalog rows, the plan that sorts them
into added / changed / updated / unchanged / deleted, and the deletion guard. (test_sync runs the same
through the real servers.)"""

from __future__ import annotations

import pytest

from client import store, sync
from core.catalog import ImageFetcher, read_catalog

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rows(sample_csv) -> tuple[list[dict], ImageFetcher]:
    df, _ = read_catalog(sample_csv, limit=20)
    return df.to_dict("records"), ImageFetcher(base_dir=df.attrs["base_dir"])


def digests_of(rows: list[dict], fetch, lexical: bool = True) -> dict[str, tuple[str, str]]:
    """What Indexer._digests computes, row by row."""
    out = {}
    for r in rows:
        embed = sync.embed_digest(r, sync.image_digest(r["image"], fetch))
        out[r[store.ID]] = (embed, sync.row_digest(r, embed, lexical))
    return out


def test_plan_sorts_every_product_into_one_list():
    catalog = {"new": ("e0", "r0"), "text": ("e1*", "r1"), "price": ("e2", "r2*"), "same": ("e3", "r3"),
               "both": ("e4*", "r4*")}
    collection = {"text": ("e1", "r1"), "price": ("e2", "r2"), "same": ("e3", "r3"), "both": ("e4", "r4"),
                  "gone": ("e5", "r5"), "gone2": ("e6", "r6")}
    plan = sync.plan(catalog, collection)
    assert plan.added == ["new"]
    assert plan.changed == ["text", "both"]  # model input changed: re-embed (the row is rewritten with it)
    assert plan.updated == ["price"]  # only stored fields: rewrite with the stored vector
    assert plan.unchanged == ["same"]
    assert plan.deleted == ["gone", "gone2"]
    assert plan.to_embed == {"new", "text", "both"}


def test_plan_edge_cases():
    assert sync.plan({}, {}) == sync.SyncPlan()
    first = sync.plan({"a": ("e", "r"), "b": ("e", "r")}, {})  # a first run embeds everything
    assert first.added == ["a", "b"] and first.to_embed == {"a", "b"} and not first.deleted
    emptied = sync.plan({}, {"a": ("e", "r")})
    assert emptied.deleted == ["a"] and not emptied.to_embed
    # An empty digest (a row written without one) never equals a real one: the product is embedded again.
    assert sync.plan({"a": ("e", "r")}, {"a": ("", "")}).changed == ["a"]


def test_digests_of_real_rows_follow_what_changed(rows):
    products, fetch = rows
    before = digests_of(products, fetch)
    assert len(before) == 20 and all(len(e) == len(r) == store.DIGEST_LENGTH for e, r in before.values())
    assert digests_of(products, fetch) == before  # deterministic: a quiet night changes nothing

    edited = [dict(r) for r in products]
    edited[0]["title"] += " limited edition"  # model input
    edited[1]["image"] = products[7]["image"]  # other photo bytes: model input
    edited[2]["price"] = 999.0  # a stored field only
    edited[3]["description"] = None  # model input (and the BM25 text)
    new = dict(products[5], product_id="new-1")
    after = digests_of([r for i, r in enumerate(edited) if i not in (4, 5)] + [new], fetch)

    plan = sync.plan(after, before)
    ids = [r[store.ID] for r in products]
    assert plan.added == ["new-1"]
    assert plan.changed == ids[:2] + [ids[3]]
    assert plan.updated == [ids[2]]
    assert plan.deleted == ids[4:6]
    assert len(plan.unchanged) == 20 - 6 and plan.to_embed == {"new-1", *ids[:2], ids[3]}


def test_row_digest_covers_the_stored_fields_and_the_model_input(rows):
    products, fetch = rows
    product = products[0]
    embed = sync.embed_digest(product, sync.image_digest(product["image"], fetch))
    row = sync.row_digest(product, embed, lexical=True)
    assert sync.row_digest({**product, "price": 1.0}, embed, True) != row
    assert sync.row_digest(product, "another embed digest", True) != row
    assert sync.row_digest(product, embed, lexical=False) != row  # the BM25 text is part of the row


def test_image_digests(rows):
    products, fetch = rows
    ref = products[0]["image"]
    assert sync.image_digest(ref, fetch) == sync.image_digest(fetch(ref), lambda data: data)  # over the bytes
    assert sync.image_digest(ref, fetch) != sync.image_digest(products[1]["image"], fetch)

    def broken(_ref):
        raise OSError("unreadable")

    def refused(_ref):
        raise ValueError("not an image reference")

    assert sync.image_digest(ref, broken) == sync.image_digest(ref, refused) == sync.MISSING_IMAGE
    # A product whose photo broke is re-embedded (text only): its model input changed.
    with_photo = sync.embed_digest(products[0], sync.image_digest(ref, fetch))
    assert sync.embed_digest(products[0], sync.MISSING_IMAGE) != with_photo


def test_digest_parts_are_separated():
    assert sync.digest("ab", "c") != sync.digest("a", "bc")
    assert sync.digest("") != sync.digest() and sync.digest("a", "") != sync.digest("a")
    assert sync.digest("\ud800 lone surrogate") == sync.digest("\ud800 lone surrogate")  # does not raise
    assert sync.embed_digest({"title": None, "description": None}, "-") == sync.embed_digest({}, "-")


def test_deletion_guard():
    plan = sync.SyncPlan(deleted=["a", "b", "c"], unchanged=["d"] * 7)
    assert sync.deletion_refused(plan, 10, 0.5, ["", ""]) == ""  # 3 of 10 <= 50%
    refused = sync.deletion_refused(plan, 10, 0.25, [])
    assert "3 of 10" in refused and "25%" in refused and "--max-delete-fraction 1" in refused
    assert sync.deletion_refused(plan, 12, 0.25, []) == ""  # exactly at the fraction (3 of 12): allowed
    assert sync.deletion_refused(plan, 3, 1.0, []) == ""  # the whole collection, when told the catalog shrank
    assert sync.deletion_refused(plan, 0, 0.0, []) == ""  # nothing stored: nothing to guard
    partial = sync.deletion_refused(plan, 10, 1.0, ["", "read with --limit 5", "2 rows are malformed"])
    assert partial == "read with --limit 5; 2 rows are malformed"  # a partial read refuses whatever the fraction
