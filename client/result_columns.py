"""A columnar fast path for pymilvus's decoding of search results.

pymilvus 2.6 decodes a search result cell by cell: for every hit and every output field, a generic
function checks the validity mask, looks up the field's type and protobuf slot, and reads one value.
A 100-deep search with the page's eight scalar fields spends most of the page's Milvus CPU there
(bench/results/service.md). For a scalar column without a validity mask a cell is only `column[i]`,
so slicing the column once gives the same values. `install()` puts that slice in front of pymilvus's
own decoder; every other column (JSON, arrays, vectors, nullable fields) still goes through pymilvus.
tests/test_unit_result_columns.py checks both decoders agree, column type by column type.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_installed = False


def columnar(decode_range: Callable[[Any, int, int], list], get_field_data: Callable[[Any], Any],
             is_scalar: Callable[[Any], bool], special: frozenset) -> Callable[[Any, int, int], list]:
    """A decode_range that slices plain scalar columns and hands every other column to `decode_range`.

    A cell past the column's end decodes to None, as pymilvus's own decoder has it.
    """

    def decode(field_data: Any, start: int, end: int) -> list:
        kind = field_data.type
        if len(field_data.valid_data) or kind in special or not is_scalar(kind):
            return decode_range(field_data, start, end)
        values = list(get_field_data(field_data)[start:end])
        return values + [None] * (end - start - len(values))

    decode.__wrapped__ = decode_range  # type: ignore[attr-defined]
    return decode


def install() -> bool:
    """Decode search results column by column from now on (idempotent). False where this pymilvus
    has no per-cell decoder to replace (then nothing changes)."""
    global _installed
    if _installed:
        return True
    try:
        from pymilvus.client import field_data_extractors, type_info
        from pymilvus.client.types import DataType
    except ImportError:  # another pymilvus layout: its own decoder stays
        logger.debug("pymilvus has no field_data_extractors: search results decoded by pymilvus")
        return False
    original = getattr(field_data_extractors, "decode_range", None)
    if original is None or not hasattr(field_data_extractors, "get_field_data"):
        return False
    field_data_extractors.decode_range = columnar(
        original, field_data_extractors.get_field_data, type_info.is_scalar_type,
        frozenset({DataType.JSON, DataType.ARRAY}))
    _installed = True
    return True
