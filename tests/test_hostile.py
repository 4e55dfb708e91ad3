"""Hostile inputs sent to the real server: each gets a clear error of its own, and the server keeps serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from client.encoder import EncodingError, TritonEncoder
from core.catalog import read_catalog

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def photo(catalog_path) -> bytes:
    df, _ = read_catalog(catalog_path, limit=1)
    return bytes(df.image[0])


@pytest.fixture(params=["http", "grpc"])
def encoder(request, triton):
    url = triton.http_url if request.param == "http" else triton.grpc_url
    return TritonEncoder(url, protocol=request.param)


def still_serving(encoder: TritonEncoder, photo: bytes) -> None:
    assert encoder.embed_queries(["blue denim jeans"]).shape == (1, encoder.embed_dim)
    assert encoder.embed_products(["Blue Jeans"], ["Apparel"], [photo]).shape == (1, encoder.embed_dim)


def _bomb() -> bytes:
    """A 1-bit PNG of 8,000 x 8,000 (64 megapixels, over the 40 M limit): a few kB on the wire."""
    buffer = io.BytesIO()
    Image.new("1", (8_000, 8_000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_decompression_bomb_is_refused_by_pixel_count(encoder, photo):
    bomb = _bomb()
    assert len(bomb) < 100_000
    with pytest.raises(EncodingError, match=r"bad image: image of 8000x8000 pixels exceeds the limit"):
        encoder.embed_images([bomb])
    with pytest.raises(EncodingError, match="exceeds the limit"):
        encoder.embed_products(["White Sheet"], ["Home"], [bomb])
    still_serving(encoder, photo)


def test_a_50_mb_upload_is_refused_by_size(encoder, photo):
    huge = photo + b"\0" * (50 * 1024 * 1024)
    with pytest.raises(EncodingError, match=r"bytes exceeds the limit"):
        encoder.embed_images([huge])
    still_serving(encoder, photo)


def test_one_bad_product_in_a_batch_fails_only_its_request(triton, photo):
    """The indexer sends many requests at once; the dynamic batcher merges them, and one broken photo must
    fail only its own request."""
    from concurrent.futures import ThreadPoolExecutor

    encoder = TritonEncoder(triton.grpc_url, "grpc")
    images = [photo] * 7 + [b"not an image at all"] + [photo] * 8

    def one(image):
        try:
            return encoder.embed_products(["Blue Jeans"], ["Apparel"], [image]).shape
        except EncodingError as exc:
            return str(exc)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, images))
    assert results.count((1, encoder.embed_dim)) == 15
    assert "bad image" in results[7]


def test_a_100k_character_query_is_truncated(encoder, photo):
    query = "red kurta " * 10_000
    assert len(query) == 100_000
    assert encoder.embed_queries([query]).shape == (1, encoder.embed_dim)
    still_serving(encoder, photo)


def test_invalid_utf8_is_refused(encoder, photo):
    with pytest.raises(EncodingError, match="UTF-8"):
        encoder.infer("query_encoder", {"QUERY": [b"red \xff\xfe kurta"]})
    with pytest.raises(EncodingError, match="UTF-8"):
        encoder.infer("product_encoder", {"TITLE": [b"\xc3\x28"], "DESCRIPTION": [b"ok"], "IMAGE": [photo]})
    still_serving(encoder, photo)


def test_an_empty_batch_is_refused(encoder, photo):
    with pytest.raises(EncodingError):
        encoder.infer("query_encoder", {"QUERY": []})
    still_serving(encoder, photo)


def _raw(triton, model: str, name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton.grpc_url)
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return client.infer(model, [tensor])


def test_wrong_dtypes_and_shapes_sent_straight_to_the_models(triton, photo):
    from tritonclient.utils import InferenceServerException

    ids = np.ones((1, 16), dtype=np.float32)
    with pytest.raises(InferenceServerException, match="(?i)data type|datatype|expected"):
        _raw(triton, "query_tower", "input_ids", ids, "FP32")
    with pytest.raises(InferenceServerException, match="(?i)input|shape|attention_mask"):
        _raw(triton, "query_tower", "input_ids", ids.astype(np.int64), "INT64")  # attention_mask missing
    pixels = np.zeros((1, 3, 10, 10), dtype=np.float32)
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        _raw(triton, "image_tower", "pixel_values", pixels, "FP32")
    with pytest.raises(InferenceServerException, match="(?i)shape|dims"):
        _raw(triton, "query_encoder", "QUERY", np.array([[[b"a"]]], dtype=object), "BYTES")
    still_serving(TritonEncoder(triton.grpc_url, "grpc"), photo)
