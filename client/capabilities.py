"""What the Milvus behind a client can do, asked once: BM25 full-text search, aliases, vector indexes.

Milvus servers say their version (get_server_version); Milvus Lite answers that call with
UNIMPLEMENTED, which is how it is told apart. Everything that depends on the server (the BM25 field,
the default index, what a message tells the user to do) reads this instead of trying and guessing
from a failure.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SERVER_INDEX_TYPES = ("AUTOINDEX", "FLAT", "IVF_FLAT", "HNSW")  # the ones client/store.py has parameters for
LITE_INDEX_TYPES = ("AUTOINDEX", "FLAT", "IVF_FLAT")  # Lite: "local mode only support FLAT IVF_FLAT AUTOINDEX"


@contextlib.contextmanager
def quiet_pymilvus():
    """pymilvus logs an ERROR line for every refused call, even the ones asked to find out."""
    log = logging.getLogger("pymilvus")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


@dataclass(frozen=True)
class Capabilities:
    """What one Milvus supports, from one question to it."""

    server: str  # "Milvus Lite" or "Milvus <version>"
    bm25: bool  # full-text search (a BM25 function into a sparse field): Milvus 2.5+ and Lite 2.5
    aliases: bool  # not needed by this project (client/serving.py routes names itself); reported
    index_types: tuple[str, ...]

    def best_index(self) -> str:
        """The vector index to build by default: HNSW where the server has it."""
        return "HNSW" if "HNSW" in self.index_types else "AUTOINDEX"


_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def capabilities(client) -> Capabilities:
    """Ask the server once (per client) what it is."""
    found = _known.get(client)
    if found is not None:
        return found
    import grpc

    try:
        with quiet_pymilvus():
            version = str(client.get_server_version())
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        found = Capabilities("Milvus Lite", bm25=True, aliases=False, index_types=LITE_INDEX_TYPES)
    else:
        numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
        found = Capabilities(f"Milvus {version}", bm25=numbers >= (2, 5), aliases=True,
                             index_types=SERVER_INDEX_TYPES)
    logger.debug("%s: %s", found.server, found)
    _known[client] = found
    return found


def lexical_missing(client, collection: str) -> str:
    """Why `collection` has no BM25 field, and what would give it one (a notice for the user)."""
    caps = capabilities(client)
    if not caps.bm25:
        return (f"{caps.server} has no BM25 full-text search: searched dense only. Serve the index from Milvus "
                "2.5+ or the local Lite server (make serve) and index the catalog there for hybrid search")
    return (f"collection {collection!r} was indexed without a BM25 field (by an older release or another "
            "Milvus): searched dense only; re-index it (client/upgrade.py, or client/index.py --recreate) for "
            "hybrid search")
