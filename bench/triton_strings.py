"""A minimal reproduction of a Triton 2.51 fault, with tritonclient and numpy only (no project imports).

Triton 2.51's Python backend (the tritonserver of nvidia-pytriton 0.7.0), serving an ensemble whose steps are
Python models (this project's product_encoder: TITLE, DESCRIPTION, IMAGE as BYTES [batch, 1]), answers
well-formed requests now and then as if they held other bytes, after requests that failed in one step (a
photo the image step cannot decode) while another step of them still ran. Each client thread loops:

    a batch of B products, one of whose photos is b"not an image"    (expected: INVALID_ARG "bad image")
    one well-formed product, batch size 1                             (expected: OK)

Every request's serialized BYTES payload is checked to hold exactly `batch` strings before and after the
send (the same bytes went out), so a refusal of a well-formed request is the server's. A refused one is sent
again with the very same InferInput objects. --no-bad sends only good photos: the control.

    python -m export.serve --model-repository model_repository --detach
    python bench/triton_strings.py --protocol grpc --url 127.0.0.1:8001 --threads 3 --seconds 35
    python bench/triton_strings.py --protocol grpc --url 127.0.0.1:8001 --threads 3 --seconds 35 --no-bad

client/encoder.py decodes photos before sending them (so its traffic never fails a step) and, on an
affected server, sends such a refused request again. Results: bench/results/triton_strings.md.
"""

from __future__ import annotations

import argparse
import collections
import re
import struct
import threading
import time
from pathlib import Path

import numpy as np

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion" / "sample" / "images" / "10164.jpg"
SIGNS = ("number of string elements", "incomplete string data", "bad image")


def strings_in(raw: bytes) -> int:
    """How many length-prefixed strings a serialized BYTES tensor holds."""
    n = offset = 0
    while offset + 4 <= len(raw):
        offset += 4 + struct.unpack_from("<I", raw, offset)[0]
        n += 1
    assert offset == len(raw)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="protocol to talk to Triton")
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton's gRPC (or HTTP) endpoint")
    p.add_argument("--threads", type=int, default=3, help="client threads, one client each")
    p.add_argument("--seconds", type=float, default=35, help="how long each thread loops")
    p.add_argument("--batch", type=int, default=8, help="products in the batch holding the broken photo")
    p.add_argument("--photo", type=Path, default=PHOTO, help="a good product photo")
    p.add_argument("--model", default="product_encoder", help="the ensemble (TITLE, DESCRIPTION, IMAGE -> EMBEDDING)")
    p.add_argument("--no-bad", action="store_true", help="the control: no broken photo in any batch")
    args = p.parse_args()
    if args.protocol == "grpc":
        import tritonclient.grpc as tc
    else:
        import tritonclient.http as tc
    photo = args.photo.read_bytes()
    counts: collections.Counter = collections.Counter()
    resent: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def tensor(name: str, values: list[bytes]):
        t = tc.InferInput(name, [len(values), 1], "BYTES")
        t.set_data_from_numpy(np.array([[v] for v in values], dtype=object))
        return t

    def request(client, titles: list[bytes], descriptions: list[bytes], images: list[bytes]) -> str:
        tensors = [tensor("TITLE", titles), tensor("DESCRIPTION", descriptions), tensor("IMAGE", images)]

        def raw(t):
            return t._raw_content if args.protocol == "grpc" else t._raw_data  # the serialized payload

        before = [(len(raw(t)), strings_in(raw(t))) for t in tensors]
        assert all(n == len(titles) for _, n in before), before
        outputs = [tc.InferRequestedOutput("EMBEDDING")]
        try:
            client.infer(args.model, tensors, outputs=outputs)
            result = "OK"
        except tc.InferenceServerException as exc:
            result = f"{exc.status()}: {exc.message()}"
            if len(titles) == 1 and any(s in result for s in SIGNS):
                try:
                    client.infer(args.model, tensors, outputs=outputs)
                    again = "OK"
                except tc.InferenceServerException as exc2:
                    again = f"{exc2.status()}: {exc2.message()[:80]}"
                with lock:
                    resent[again] += 1
        assert [(len(raw(t)), strings_in(raw(t))) for t in tensors] == before  # the same bytes went out
        return result

    def worker(i: int) -> None:
        client = tc.InferenceServerClient(args.url)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            images = [photo] * args.batch
            if not args.no_bad:
                images[i % args.batch] = b"not an image"
            failing = request(client, [b"Puma Men's Black T-shirt %d" % k for k in range(args.batch)],
                              [b"Apparel - Topwear - Tshirts - Black - Sports"] * args.batch, images)
            good = request(client, [b"Nike Women Blue Jeans"], [b"Apparel - Bottomwear - Jeans - Blue - Casual"],
                           [photo])
            with lock:  # messages grouped with their numbers (lengths, counts) written N
                counts[(f"batch of {args.batch}", "with a broken photo" if not args.no_bad else "good",
                        re.sub(r"\d+", "N", failing.split(" (")[0])[:110])] += 1
                counts[("batch of 1", "good", re.sub(r"\d+", "N", good)[:110])] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{args.protocol} threads={args.threads} batch={args.batch} broken photos={'no' if args.no_bad else 'yes'} "
          f"{time.time() - started:.0f}s")
    for key, n in counts.most_common():
        print(f"  {n:6d}  {key}")
    good = sum(n for (size, _, _), n in counts.items() if size == "batch of 1")
    refused = good - counts[("batch of 1", "good", "OK")]
    print(f"  well-formed requests of 1: {good}, refused: {refused} ({refused / max(good, 1):.1%}); sent again: "
          f"{sum(resent.values())}, of which OK: {resent['OK']}")


if __name__ == "__main__":
    main()
