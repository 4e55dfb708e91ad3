"""The columnar decoding of search results (client/result_columns.py) gives what pymilvus's own decoder gives.

Real pymilvus protobuf messages, column type by column type, every slice of every column; then whole search
results (two queries, several fields) through pymilvus's own SearchResult, with the fast path and without.
"""

from __future__ import annotations

import pytest
from pymilvus.client import field_data_extractors, search_result, type_info
from pymilvus.client.types import DataType
from pymilvus.grpc_gen import schema_pb2

from client import result_columns

pytestmark = pytest.mark.unit

ORIGINAL = getattr(field_data_extractors.decode_range, "__wrapped__", field_data_extractors.decode_range)
FAST = result_columns.columnar(ORIGINAL, field_data_extractors.get_field_data, type_info.is_scalar_type,
                               frozenset({DataType.JSON, DataType.ARRAY}))


def column(name: str, kind: DataType, values: list, valid: list[bool] | None = None) -> schema_pb2.FieldData:
    data = schema_pb2.FieldData(field_name=name, type=kind)
    if kind == DataType.VARCHAR:
        data.scalars.string_data.data.extend(values)
    elif kind == DataType.FLOAT:
        data.scalars.float_data.data.extend(values)
    elif kind == DataType.DOUBLE:
        data.scalars.double_data.data.extend(values)
    elif kind == DataType.INT64:
        data.scalars.long_data.data.extend(values)
    elif kind == DataType.INT32:
        data.scalars.int_data.data.extend(values)
    elif kind == DataType.BOOL:
        data.scalars.bool_data.data.extend(values)
    elif kind == DataType.JSON:
        data.scalars.json_data.data.extend(values)
    elif kind == DataType.ARRAY:
        data.scalars.array_data.element_type = DataType.INT64
        for row in values:
            data.scalars.array_data.data.add().long_data.data.extend(row)
    elif kind == DataType.FLOAT_VECTOR:
        data.vectors.dim = 2
        data.vectors.float_vector.data.extend(v for row in values for v in row)
    if valid is not None:
        data.valid_data.extend(valid)
    return data


COLUMNS = [
    column("title", DataType.VARCHAR, ["Red Kurta", "Blue Jeans", "", "Watch \u00e9t\u00e9"]),
    column("price", DataType.FLOAT, [10.5, -1.0, 3.25, 0.0]),
    column("score", DataType.DOUBLE, [0.1, 0.2, 0.3, 0.4]),
    column("stock", DataType.INT64, [1, 2, 3, 2**40]),
    column("rank", DataType.INT32, [4, 3, 2, 1]),
    column("new", DataType.BOOL, [True, False, True, False]),
    column("meta", DataType.JSON, [b'{"a": 1}', b"[]", b'"x"', b"null"]),
    column("sizes", DataType.ARRAY, [[1, 2], [], [3], [4, 5, 6]]),
    column("vec", DataType.FLOAT_VECTOR, [[0.5, 0.25], [1.0, 0.0], [0.0, 1.0], [0.75, 0.5]]),
    # a nullable field: pymilvus sends every row's value and a validity mask
    column("usage", DataType.VARCHAR, ["Casual", "", "Formal", ""], valid=[True, False, True, False]),
    column("short", DataType.VARCHAR, ["only", "two"]),  # a column shorter than the hits: the rest are None
]


@pytest.mark.parametrize("data", COLUMNS, ids=[c.field_name for c in COLUMNS])
def test_every_slice_of_a_column_decodes_as_pymilvus_decodes_it(data):
    for start in range(5):
        for end in range(start, 5):
            assert FAST(data, start, end) == ORIGINAL(data, start, end), (start, end)


def test_only_plain_scalar_columns_take_the_fast_path():
    sliced = {c.field_name for c in COLUMNS
              if not c.valid_data and c.type not in (DataType.JSON, DataType.ARRAY)
              and type_info.is_scalar_type(c.type)}
    assert sliced == {"title", "price", "score", "stock", "rank", "new", "short"}


def results() -> schema_pb2.SearchResultData:
    """Two queries of two hits each, with the page's kinds of output fields (and a nullable one)."""
    res = schema_pb2.SearchResultData(num_queries=2, top_k=2, primary_field_name="product_id")
    res.ids.str_id.data.extend(["p1", "p2", "p3", "p4"])
    res.scores.extend([0.9, 0.8, 0.7, 0.6])
    res.topks.extend([2, 2])
    res.output_fields.extend(["title", "price", "usage"])
    res.fields_data.extend([COLUMNS[0], COLUMNS[1], COLUMNS[9]])
    return res


def decoded(res: schema_pb2.SearchResultData) -> list:
    return [[(h["product_id"], h["distance"], dict(h["entity"])) for h in hits]
            for hits in search_result.SearchResult(res)]


def test_installed_search_results_decode_as_before(monkeypatch):
    monkeypatch.setattr(field_data_extractors, "decode_range", ORIGINAL)
    before = decoded(results())
    monkeypatch.setattr(result_columns, "_installed", False)
    assert result_columns.install()
    assert field_data_extractors.decode_range is not ORIGINAL  # pymilvus now calls ours
    assert decoded(results()) == before
    assert before[1][0] == ("p3", pytest.approx(0.7), {"title": "", "price": 3.25, "usage": "Formal"})
    assert before[0][1][2]["usage"] is None  # the mask, honoured
