"""The Triton and Milvus flags every client command shares (index, search, evaluate, upgrade, the page).

Kept apart from index.py so that the search path does not import the catalog readers (pandas).
"""

from __future__ import annotations

import argparse

from client.deadlines import BATCH_TIMEOUT_S, SEARCH_TIMEOUT_S
from client.store import COLLECTION, DEFAULT_URI


def add_connection_args(p: argparse.ArgumentParser, batch: bool = False) -> None:
    """The shared flags; `batch` adds the deadline of a batch job's calls (commands that index or evaluate)."""
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
    p.add_argument("--timeout", type=float, default=SEARCH_TIMEOUT_S,
                   help="seconds a Triton or Milvus search, read, health check or (on the search path) load may "
                        "take before it fails (Milvus rounds up to whole seconds)")
    if batch:
        p.add_argument("--batch-timeout", type=float, default=BATCH_TIMEOUT_S,
                       help="seconds a batch call may take before it fails: a Milvus write, collection change or "
                            "load, a Triton request of a batch of products or evaluation queries")


def connect(args: argparse.Namespace):
    """The Milvus client the flags describe, with their deadlines (client/deadlines.py); a command without
    --batch-timeout (a search) gives every call the search deadline."""
    from client import store

    return store.connect(args.milvus_uri, args.token, args.user, args.password, args.timeout,
                         getattr(args, "batch_timeout", args.timeout))
