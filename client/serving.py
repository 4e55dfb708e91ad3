"""What a serving name points at.

A serving name (`products`) is what searchers ask for; an upgrade indexes a new model into
`products__<fingerprint>` and then points the name at it. The pointer is one row of a small routes
collection (ROUTES) in the same Milvus: upserting that row is the switch, atomic for every searcher
(each resolves the name once per search and uses that one answer for its embedding and its
search). Milvus aliases would do the same on a server, but Milvus Lite has none, and one mechanism on
every backend is what keeps upgrades and rollbacks tested here the same as on the cluster. A name
with no route is the collection of that name (made by client/index.py before any upgrade), or an
alias made by an older release (describe_collection follows it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from client.store import MODEL_KEY, PREVIOUS_KEY, TAG_KEY, StoreError, description

logger = logging.getLogger(__name__)

ROUTES = "mmsearch_routes"  # the routes collection: serving name -> collection
ROUTE_NAME, ROUTE_TARGET, ROUTE_PREVIOUS = "name", "target", "previous"
_ROUTE_VECTOR = "unused"  # Milvus requires a vector field in every collection
NAME_MAX_LENGTH = 255  # Milvus's own limit on a collection name


@dataclass(frozen=True)
class Route:
    name: str
    target: str
    previous: str | None


def route(client, name: str) -> Route | None:
    """The route of serving name `name` (None: it has none)."""
    if not client.has_collection(ROUTES):
        return None
    rows = client.get(ROUTES, ids=[name], output_fields=[ROUTE_TARGET, ROUTE_PREVIOUS], consistency_level="Strong")
    if not rows:
        return None
    return Route(name, rows[0][ROUTE_TARGET], rows[0][ROUTE_PREVIOUS] or None)


def resolve(client, name: str) -> str | None:
    """The collection serving name `name` stands for now (None: nothing by that name)."""
    found = route(client, name)
    if found is not None:
        return found.target
    if not client.has_collection(name):
        return None
    return client.describe_collection(name).get("collection_name") or name  # an old alias


@dataclass(frozen=True)
class CollectionRecord:
    """What a serving name resolves to: the collection behind it and the model its vectors came from,
    read together, so a query never pairs one model with another's vectors."""

    collection: str
    fingerprint: str | None  # None: not recorded (a collection made before fingerprints)
    tag: str = ""
    previous: str | None = None  # what the name served before this collection (for a rollback)


def collection_record(client, name: str) -> CollectionRecord:
    """The record of what `name` serves; raises StoreError when nothing does."""
    found = route(client, name)
    collection = found.target if found is not None else name
    if not client.has_collection(collection):
        raise StoreError(f"no collection {name!r}: index a catalog first (python client/index.py --catalog PATH)")
    collection, record = description(client, collection)  # follows an old alias to its collection
    previous = found.previous if found is not None else record.get(PREVIOUS_KEY)
    return CollectionRecord(collection, record.get(MODEL_KEY), record.get(TAG_KEY) or "", previous)


def versioned_name(name: str, fingerprint: str) -> str:
    """The collection an upgrade indexes a model into, behind serving name `name` (Milvus names: \\w only)."""
    return f"{name}__{re.sub(r'[^0-9A-Za-z_]', '_', fingerprint)}"


def _ensure_routes(client) -> None:
    if client.has_collection(ROUTES):
        return
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                  description="mmsearch: serving name -> collection (client/serving.py)")
    schema.add_field(ROUTE_NAME, DataType.VARCHAR, is_primary=True, max_length=NAME_MAX_LENGTH)
    schema.add_field(ROUTE_TARGET, DataType.VARCHAR, max_length=NAME_MAX_LENGTH)
    schema.add_field(ROUTE_PREVIOUS, DataType.VARCHAR, max_length=NAME_MAX_LENGTH)
    schema.add_field(_ROUTE_VECTOR, DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index(_ROUTE_VECTOR, index_type="FLAT", metric_type="L2")
    client.create_collection(ROUTES, schema=schema, index_params=index)


def switch(client, name: str, target: str) -> str | None:
    """Point serving name `name` at collection `target` (one row upsert: atomic for searchers);
    returns the collection it served before (None: nothing)."""
    if not client.has_collection(target):
        raise StoreError(f"cannot serve {name!r} from {target!r}: no such collection")
    before = resolve(client, name)
    _ensure_routes(client)
    client.upsert(ROUTES, [{ROUTE_NAME: name, ROUTE_TARGET: target, ROUTE_PREVIOUS: before or "",
                            _ROUTE_VECTOR: [0.0, 0.0]}])
    logger.info("%s now serves %s (before: %s)", name, target, before)
    return before


def rollback(client, name: str) -> str:
    """Serve what `name` served before the last switch again; returns that collection."""
    record = collection_record(client, name)
    if not record.previous or not client.has_collection(record.previous):
        raise StoreError(f"{name} serves {record.collection}, which records no previous collection to go back to")
    switch(client, name, record.previous)
    return record.previous
