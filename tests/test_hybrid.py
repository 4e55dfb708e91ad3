"""Hybrid retrieval on real Milvus Lite over real products: BM25 beside the dense vector, fused."""

from __future__ import annotations

import pytest

from client import serving, store
from client.encoder import TritonEncoder
from client.filters import filter_expression
from client.fusion import facet_counts, fuse, lexical_confidence
from client.index import Indexer
from client.search import Searcher

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def searcher(triton, catalog_with_codes, tmp_path_factory):
    client = store.connect(str(tmp_path_factory.mktemp("hybrid_db") / "hybrid.db"))
    Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_with_codes[0]))
    yield Searcher(TritonEncoder(triton.grpc_url, "grpc"), client, "products")
    client.close()


@pytest.fixture(scope="module")
def codes(catalog_with_codes) -> list[tuple[str, list[str]]]:
    """(model code, product ids whose title holds it) among the indexed products."""
    return catalog_with_codes[1]


def test_a_model_code_finds_its_product_first(searcher, codes):
    assert len(codes) >= 30
    first = {mode: sum(searcher.search(code, k=5, mode=mode).hits[0].product_id in pids for code, pids in codes)
             for mode in ("hybrid", "lexical", "dense")}
    assert first["lexical"] == len(codes)
    assert first["hybrid"] >= 0.9 * len(codes) and first["hybrid"] > first["dense"], first


def test_collection_holds_bm25_text_and_searches_report_their_mode(searcher):
    assert store.has_lexical(searcher.client, "products")
    row = searcher.client.query("products", filter="", output_fields=[store.TEXT], limit=1)[0]
    assert row[store.TEXT]  # the text BM25 reads, written by the indexer
    assert searcher.search("white running shoes", k=3).mode == "hybrid"
    assert searcher.search("white running shoes", k=3, mode="lexical").embed_ms < 1.0  # no Triton call


def test_facets_count_the_top_hits_and_a_facet_value_filters(searcher):
    result = searcher.search("shirt", k=10)
    colours = dict(result.facets["base_colour"])
    assert colours and sum(colours.values()) <= 100
    colour, count = result.facets["base_colour"][0]
    assert count == max(colours.values())
    filtered = searcher.search("shirt", k=10, expression=filter_expression({"colour": colour}))
    assert filtered.hits and {h.fields["base_colour"] for h in filtered.hits} == {colour}
    assert dict(filtered.facets["base_colour"]) == {colour: dict(filtered.facets["base_colour"])[colour]}


@pytest.mark.parametrize("text", ['red" or 1==1', "shoes AND (nike OR puma) -adidas", "😀🔥👟", "!!!...???",
                                  "x" * 10_000, "ñandú café", "base_colour == 'Red'", "%s %d {0} ${x}"])
def test_hostile_query_text_gets_results_or_nothing_never_an_error(searcher, text):
    for mode in ("hybrid", "lexical", "dense"):
        result = searcher.search(text, k=5, mode=mode)
        assert isinstance(result.hits, list) and len(result.hits) <= 5


def test_a_collection_without_bm25_says_so_and_searches_dense(triton, catalog_path, tmp_path):
    """A collection made before lexical search (the previous schema): indexed and searched dense, with a note."""
    from pymilvus import DataType

    client = store.connect(str(tmp_path / "old.db"))
    encoder = TritonEncoder(triton.grpc_url, "grpc")
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(store.ID, DataType.VARCHAR, is_primary=True, max_length=store.ID_MAX_LENGTH)
    schema.add_field(store.VECTOR, DataType.FLOAT_VECTOR, dim=encoder.embed_dim)
    for name, length in store.SCALARS.items():
        schema.add_field(name, DataType.FLOAT) if length is None else \
            schema.add_field(name, DataType.VARCHAR, max_length=length)
    index = client.prepare_index_params()
    index.add_index(store.VECTOR, index_type="AUTOINDEX", metric_type=store.METRIC)
    client.create_collection("products", schema=schema, index_params=index)
    report = Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=20)
    assert report.indexed == 20 and not store.has_lexical(client, "products")
    result = Searcher(encoder, client, "products").search("blue shirt", k=3)
    assert result.mode == "dense" and result.hits and "--recreate" in result.notice
    client.close()


class _Hit:
    def __init__(self, pid, score):
        self.product_id, self.score, self.fields = pid, score, {"base_colour": "Red" if pid < "c" else "Blue"}


def test_fusion_trusts_a_confident_lexical_match_and_blends_otherwise():
    dense = [store.Hit(p, s, {}) for p, s in (("a", 0.80), ("b", 0.79), ("c", 0.78))]
    flat = [store.Hit(p, 10.0 - i * 0.1, {}) for i, p in enumerate("cdefghijkl")]  # BM25 sees no rare term
    peaked = [store.Hit("z", 30.0, {}), *[store.Hit(p, 5.0, {}) for p in "defghijkl"]]  # a code matched
    assert lexical_confidence(flat) < 1.5 <= lexical_confidence(peaked)
    assert fuse(dense, peaked)[0].product_id == "z"  # the exact match leads
    blended = [h.product_id for h in fuse(dense, flat)]
    assert blended[0] == "c"  # in both lists: dense and lexical agree
    assert set(blended) == set("abcdefghijkl")
    assert facet_counts([_Hit("a", 1), _Hit("b", 1), _Hit("c", 1)], ["base_colour"]) == {
        "base_colour": [("Red", 2), ("Blue", 1)]}


def test_a_collection_of_another_model_is_refused_with_what_to_do(triton, searcher, catalog_path, tmp_path):
    """Same dimension, other weights: searching one model's vectors with the other's queries is refused."""
    encoder = searcher.encoder
    assert encoder.fingerprint != "unknown"
    assert serving.collection_record(searcher.client, "products").fingerprint == encoder.fingerprint  # recorded
    client = store.connect(str(tmp_path / "other.db"))
    store.ensure_collection(client, encoder.embed_dim, "products", fingerprint="0123456789ab-int8")
    with pytest.raises(store.StoreError, match="new --collection"):
        Indexer(triton.grpc_url, "grpc", client, "products").run(str(catalog_path), limit=5)
    with pytest.raises(store.StoreError, match="serves model"):
        Searcher(encoder, client, "products")
    assert store.count(client, "products") == 0  # nothing of the other model was mixed in
    client.close()
