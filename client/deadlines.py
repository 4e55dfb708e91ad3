"""How long any Triton or Milvus call may take: the defaults, in one place, and the Milvus client that applies them.

Commands take them as `--timeout` and, where they run batch jobs, `--batch-timeout` (client/connection.py):
- SEARCH_TIMEOUT_S: a search, a read, a describe, a health check, and (on the search path) a load. A
  search answers or fails within it; the page answers an outage with a 503 within it plus its own work.
- BATCH_TIMEOUT_S: what a batch job's call may take: a Milvus upsert, creating or dropping a collection
  and its index, loading a collection an indexer writes to (a cluster may load millions of vectors),
  reading thousands of rows back (digests, counts), one Triton request of products with photos or of
  evaluation queries (on a CPU). A command without batch work (a search, the page) uses the search
  deadline for these too.

Milvus deadlines are whole seconds: older pymilvus releases honour a float only as the per-attempt
gRPC deadline and keep retrying a dead server, up to 75 times, unless the timeout is an int.
"""

from __future__ import annotations

import functools
import math

SEARCH_TIMEOUT_S = 5
BATCH_TIMEOUT_S = 60
LITE_START_TIMEOUT_S = 60  # opening a Milvus Lite file starts its engine in the process (not a network call)

# MilvusClient calls that may take long on a big collection: they get the batch deadline.
SLOW_CALLS = frozenset({"create_collection", "drop_collection", "create_index", "drop_index", "load_collection",
                        "release_collection", "upsert", "insert", "delete", "flush", "compact", "rename_collection",
                        "get", "query", "query_iterator"})  # reads of thousands of rows (an indexer's digests)
# MilvusClient methods that never reach the server: no deadline to give.
LOCAL_CALLS = frozenset({"close", "create_schema", "prepare_index_params", "create_field_schema",
                         "create_struct_field_schema", "get_server_type", "use_database", "using_database"})


def whole_seconds(timeout_s: float) -> int:
    """A deadline pymilvus honours (an int), never shorter than asked."""
    return max(1, math.ceil(timeout_s))


class DeadlineClient:
    """A pymilvus MilvusClient whose every server call carries a deadline unless the caller gives one.

    Call sites never pass a timeout: the deadlines of a client are chosen where it is made
    (client/store.py connect), so a new call site cannot forget one.
    """

    def __init__(self, client, timeout_s: float = SEARCH_TIMEOUT_S, batch_timeout_s: float = BATCH_TIMEOUT_S):
        self.client = client
        self.timeout_s, self.batch_timeout_s = whole_seconds(timeout_s), whole_seconds(batch_timeout_s)

    def __getattr__(self, name: str):
        attr = getattr(self.client, name)
        if name.startswith("_") or name in LOCAL_CALLS or not callable(attr):
            return attr
        deadline = self.batch_timeout_s if name in SLOW_CALLS else self.timeout_s

        @functools.wraps(attr)
        def call(*args, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = deadline
            return attr(*args, **kwargs)

        return call

    def __repr__(self) -> str:
        return f"DeadlineClient({self.timeout_s} s, batch calls {self.batch_timeout_s} s)"
