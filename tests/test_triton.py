"""Against a real tritonserver serving the exported tiny towers, over HTTP and gRPC."""

import re
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder
from core.catalog import read_catalog
from core.preprocess import image_to_pixels, product_text
from training.encode import tokenize
from training.factory import create_model, create_tokenizer, load_checkpoint_config

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def rows(catalog_path):
    df, _ = read_catalog(catalog_path, limit=12)
    return df


@pytest.fixture(scope="module")
def torch_model(tiny_checkpoint):
    return create_model(tiny_checkpoint).eval(), create_tokenizer(tiny_checkpoint), \
        load_checkpoint_config(tiny_checkpoint)["preprocess_cfg"]


@pytest.fixture(params=["http", "grpc"])
def encoder(request, triton):
    url = triton.http_url if request.param == "http" else triton.grpc_url
    return TritonEncoder(url, protocol=request.param)


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


@torch.no_grad()
def _torch_products(torch_model, rows, image_mask):
    model, tokenizer, pre = torch_model
    texts = [product_text(t, d) for t, d in zip(rows.title, rows.description)]
    batch = tokenize(tokenizer, texts, pre["max_length"])
    pixels = torch.from_numpy(np.stack([image_to_pixels(b, pre["image"]) for b in rows.image]))
    return model.encode_product(**batch, pixel_values=pixels, image_mask=torch.tensor(image_mask)).numpy()


def test_query_ensemble_equals_the_pytorch_tower(encoder, torch_model):
    model, tokenizer, pre = torch_model
    queries = ["women's red kurta", "puma running shoes", "black leather wallet for men"]
    with torch.no_grad():
        expected = model.encode_query(**tokenize(tokenizer, queries, pre["query_max_length"])).numpy()
    got = encoder.embed_queries(queries)
    assert got.shape == (3, model.cfg.embed_dim) == (3, encoder.embed_dim)
    assert _cos(got, expected).min() > 0.999


def test_product_ensemble_equals_the_pytorch_towers_with_and_without_images(encoder, torch_model, rows):
    images = [bytes(b) for b in rows.image]
    got = encoder.embed_products(rows.title.tolist(), rows.description.tolist(), images)
    assert _cos(got, _torch_products(torch_model, rows, [1.0] * len(rows))).min() > 0.999
    missing = encoder.embed_products(rows.title.tolist(), rows.description.tolist(), [None] * len(rows))
    assert _cos(missing, _torch_products(torch_model, rows, [0.0] * len(rows))).min() > 0.999
    assert _cos(missing, got).max() < 0.9999  # the image really counts


def test_image_queries_land_next_to_their_product(encoder, torch_model, rows):
    images = [bytes(b) for b in rows.image]
    image_emb = encoder.embed_images(images)
    product_emb = encoder.embed_products(rows.title.tolist(), rows.description.tolist(), images)
    model, _, pre = torch_model
    pixels = torch.from_numpy(np.stack([image_to_pixels(b, pre["image"]) for b in images]))
    with torch.no_grad():
        expected = model.encode_image_query(model.encode_image(pixels)).numpy()
    assert _cos(image_emb, expected).min() > 0.999
    n = len(images)  # calibrated so that a photo's own product comes first (training/calibrate.py)
    assert (np.argmax(image_emb @ product_emb.T, axis=1) == np.arange(n)).mean() > 0.8


def test_a_bad_image_is_a_clear_error_and_the_server_keeps_serving(encoder, rows):
    with pytest.raises(EncodingError, match="bad image: not a decodable image"):
        encoder.embed_products(["Red Shirt"], ["Apparel"], [b"\x89PNG but not really"])
    truncated = bytes(rows.image[0])[:200]
    with pytest.raises(EncodingError, match="bad image"):
        encoder.embed_images([truncated])
    assert encoder.embed_products(["Red Shirt"], ["Apparel"], [bytes(rows.image[0])]).shape[0] == 1


def test_empty_query_is_refused_by_server_and_client(encoder):
    with pytest.raises(EncodingError, match="empty query"):
        encoder.embed_queries(["   "])
    with pytest.raises(EncodingError, match="empty query"):
        encoder.infer("query_encoder", {"QUERY": [""]})  # straight to the server


def test_an_over_long_query_is_truncated_not_refused(encoder):
    head = "red cotton kurta for women with golden embroidery and mirror work"
    long_query = head + " and more words" * 5000  # ~80k characters
    long_emb, head_emb = encoder.embed_queries([long_query]), encoder.embed_queries([head + " and more words" * 3])
    assert _cos(long_emb, head_emb)[0] > 0.9999  # only the first query_max_length tokens count


def test_concurrent_requests_are_batched(tiny_repository, tmp_path):
    """Sixteen queries sent at once (a barrier) into a query tower configured to wait for sixteen (preferred
    batch 16, queue delay 10 s) run as one execution per round: the dynamic batcher merges them. With the
    shipped delay of 0, merging depends on arrival timing, which a test cannot rely on."""
    import tritonclient.http as http

    from export.serve import TritonServer

    repo = tmp_path / "repository"
    shutil.copytree(tiny_repository, repo)
    config = repo / "query_tower" / "config.pbtxt"
    waits = "dynamic_batching {\n  preferred_batch_size: [ 16 ]\n  max_queue_delay_microseconds: 10000000\n}"
    text, replaced = re.subn(r"dynamic_batching \{[^}]*\}", waits, config.read_text())
    assert replaced == 1
    config.write_text(text)
    rounds, width = 3, 16
    with TritonServer.on_free_ports(repo, log_file=tmp_path / "triton.log") as server:
        stats = http.InferenceServerClient(server.http_url)
        encoders = [TritonEncoder(server.grpc_url, protocol="grpc", timeout_s=30) for _ in range(width)]
        barrier, errors = threading.Barrier(width), []

        def worker(i: int) -> None:
            try:
                for j in range(rounds):
                    barrier.wait(30)
                    encoders[i].embed_queries([f"query {i} {j} blue jeans"])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        deadline = time.monotonic() + 10  # Triton counts a request once its response is sent
        while True:
            model = stats.get_inference_statistics("query_tower")["model_stats"][0]
            if model["inference_count"] >= rounds * width or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (model["inference_count"], model["execution_count"]) == (rounds * width, rounds)


def test_unreachable_server_says_where_and_what_to_run():
    from core.server_process import free_port

    encoder = TritonEncoder(f"127.0.0.1:{free_port()}", protocol="http", timeout_s=2)
    with pytest.raises(EncoderUnavailable, match="python -m export.serve"):
        encoder.check_ready()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_current_tritonclient_talks_to_the_2_51_server(triton, protocol):
    """The client is not locked to the server's release (the KServe v2 protocol is stable): the installed
    tritonclient, newer than the server, reads its metadata and runs the query ensemble over both protocols."""
    from importlib.metadata import version

    from client.encoder import protocol_module

    module = protocol_module(protocol)
    server = module.InferenceServerClient(triton.grpc_url if protocol == "grpc" else triton.http_url)
    try:
        metadata = server.get_server_metadata(**({"as_json": True} if protocol == "grpc" else {}))
    finally:
        server.close()
    client_release = tuple(int(x) for x in version("tritonclient").split(".")[:2])
    server_release = tuple(int(x) for x in metadata["version"].split(".")[:2])
    assert server_release == (2, 51) and client_release > server_release, (client_release, metadata["version"])
    encoder = TritonEncoder(triton.grpc_url if protocol == "grpc" else triton.http_url, protocol)
    try:
        vector, dim = encoder.embed_queries(["red kurta"])[0], encoder.embed_dim
    finally:
        encoder.close()
    assert vector.shape == (dim,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4
