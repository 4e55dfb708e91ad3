"""The Triton and Milvus flags every client command shares (index, search, evaluate, upgrade, the page).

Kept apart from index.py so that the search path does not import the catalog readers (pandas).
"""

from __future__ import annotations

import argparse

from client.store import COLLECTION, DEFAULT_URI


def add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--triton-url", default="127.0.0.1:8001",
                   help="Triton endpoint, host:port (gRPC port for --protocol grpc, HTTP port for http)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="protocol to talk to Triton")
    p.add_argument("--milvus-uri", default=DEFAULT_URI,
                   help="Milvus Lite file (path), the shared local server (make serve: http://127.0.0.1:19530) "
                        "or a Milvus cluster (http://host:19530); env MILVUS_URI")
    p.add_argument("--collection", default=COLLECTION,
                   help="serving name: a collection, or a name client/upgrade.py routes to one")
    p.add_argument("--token", default=None, help="Milvus token (or env MILVUS_TOKEN); never logged")
    p.add_argument("--user", default=None, help="Milvus user (or env MILVUS_USER)")
    p.add_argument("--password", default=None, help="Milvus password (or env MILVUS_PASSWORD); never logged")
