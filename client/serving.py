"""What a serving name points at.

A serving name (`products`) is what searchers ask for; an upgrade indexes a new model into
`products__<fingerprint>` and then points the name at it. The pointer is one row of a small routes
collection (ROUTES) in the same Milvus: upserting that row is the switch, atomic for every searcher
(each resolves the name once per search and uses that one answer for its embedding and its
search). Milvus aliases would do the same on a server, but Milvus Lite has none, and one mechanism on
every backend is what keeps upgrades and rollbacks tested here the same as on the cluster. A name
with no route is the collection of that name (made by client/index.py before any upgrade), or an
alias made by an older release (describe_collection follows it).

A route may also name a query model set (`query_tag`): a model trained to embed queries into the
space of the collection's product vectors (training/from_judgments.py keeps the product tower and
records its fingerprint as the model set's "product_space"). Such a promotion changes only the
query side, so it reuses the collection as it is: nothing is re-indexed. Photos are still embedded
by the collection's own model set (they are product-side). A searcher refuses a query model whose
product space is not the collection's model, so the two sides are never mixed either way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from client.store import MODEL_KEY, PREVIOUS_KEY, TAG_KEY, StoreError, description

logger = logging.getLogger(__name__)

ROUTES = "mmsearch_routes"  # the routes collection: serving name -> collection
ROUTE_NAME, ROUTE_TARGET, ROUTE_PREVIOUS = "name", "target", "previous"
# The query model set the name embeds queries with ("" = the collection's own), and the one it used before.
ROUTE_QUERY_TAG, ROUTE_PREVIOUS_QUERY_TAG = "query_tag", "previous_query_tag"
TAG_MAX_LENGTH = 64
_ROUTE_VECTOR = "unused"  # Milvus requires a vector field in every collection
NAME_MAX_LENGTH = 255  # Milvus's own limit on a collection name


@dataclass(frozen=True)
class Route:
    name: str
    target: str
    previous: str | None
    query_tag: str = ""  # "" = the target collection's own model set embeds queries
    previous_query_tag: str = ""


def route(client, name: str) -> Route | None:
    """The route of serving name `name` (None: it has none)."""
    if not client.has_collection(ROUTES):
        return None
    # "*": a routes collection made by an older release has no query-tag fields (read as "").
    rows = client.get(ROUTES, ids=[name], output_fields=["*"], consistency_level="Strong")
    if not rows:
        return None
    row = rows[0]
    return Route(name, row[ROUTE_TARGET], row[ROUTE_PREVIOUS] or None, row.get(ROUTE_QUERY_TAG) or "",
                 row.get(ROUTE_PREVIOUS_QUERY_TAG) or "")


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
    tag: str = ""  # the model set that made the collection's vectors (it embeds photos)
    previous: str | None = None  # what the name served before this collection (for a rollback)
    query_tag: str | None = None  # the model set that embeds text queries; None: `tag`'s own query encoder

    @property
    def query_model_set(self) -> str:
        return self.tag if self.query_tag is None else self.query_tag


def collection_record(client, name: str) -> CollectionRecord:
    """The record of what `name` serves; raises StoreError when nothing does."""
    found = route(client, name)
    collection = found.target if found is not None else name
    if not client.has_collection(collection):
        raise StoreError(f"no collection {name!r}: index a catalog first (python client/index.py --catalog PATH)")
    collection, record = description(client, collection)  # follows an old alias to its collection
    previous = found.previous if found is not None else record.get(PREVIOUS_KEY)
    query_tag = found.query_tag if found is not None and found.query_tag else None
    return CollectionRecord(collection, record.get(MODEL_KEY), record.get(TAG_KEY) or "", previous, query_tag)


def versioned_name(name: str, fingerprint: str) -> str:
    """The collection an upgrade indexes a model into, behind serving name `name` (Milvus names: \\w only)."""
    return f"{name}__{re.sub(r'[^0-9A-Za-z_]', '_', fingerprint)}"


def _has_query_tags(client) -> bool:
    fields = client.describe_collection(ROUTES).get("fields", [])
    return any(f.get("name") == ROUTE_QUERY_TAG for f in fields)


def _ensure_routes(client, query_tags: bool = False) -> None:
    """Make the routes collection; `query_tags`: one with the query-tag fields, migrating an older one (its
    rows are rewritten into the new schema; a searcher resolving during those milliseconds finds no route
    and serves the collection named like the serving name, if any: one model, never a mix)."""
    if client.has_collection(ROUTES):
        if not query_tags or _has_query_tags(client):
            return
        rows = list(client.query(ROUTES, filter=f'{ROUTE_NAME} != ""', output_fields=["*"],
                                 consistency_level="Strong"))
        logger.warning("migrating %s to a schema with query model sets (%d routes)", ROUTES, len(rows))
        client.drop_collection(ROUTES)
        _create_routes(client)
        if rows:
            client.upsert(ROUTES, [{**_row(r[ROUTE_NAME], r[ROUTE_TARGET], r[ROUTE_PREVIOUS] or "")} for r in rows])
        return
    _create_routes(client)


def _row(name: str, target: str, previous: str, query_tag: str = "", previous_query_tag: str = "") -> dict:
    return {ROUTE_NAME: name, ROUTE_TARGET: target, ROUTE_PREVIOUS: previous, ROUTE_QUERY_TAG: query_tag,
            ROUTE_PREVIOUS_QUERY_TAG: previous_query_tag, _ROUTE_VECTOR: [0.0, 0.0]}


def _create_routes(client) -> None:
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False,
                                  description="mmsearch: serving name -> collection (client/serving.py)")
    schema.add_field(ROUTE_NAME, DataType.VARCHAR, is_primary=True, max_length=NAME_MAX_LENGTH)
    schema.add_field(ROUTE_TARGET, DataType.VARCHAR, max_length=NAME_MAX_LENGTH)
    schema.add_field(ROUTE_PREVIOUS, DataType.VARCHAR, max_length=NAME_MAX_LENGTH)
    schema.add_field(ROUTE_QUERY_TAG, DataType.VARCHAR, max_length=TAG_MAX_LENGTH)
    schema.add_field(ROUTE_PREVIOUS_QUERY_TAG, DataType.VARCHAR, max_length=TAG_MAX_LENGTH)
    schema.add_field(_ROUTE_VECTOR, DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index(_ROUTE_VECTOR, index_type="FLAT", metric_type="L2")
    client.create_collection(ROUTES, schema=schema, index_params=index)


def switch(client, name: str, target: str, query_tag: str = "") -> str | None:
    """Point serving name `name` at collection `target`, its text queries embedded by model set `query_tag`
    ("" = the collection's own); one row upsert: atomic for searchers. Returns the collection it served
    before (None: nothing)."""
    if not client.has_collection(target):
        raise StoreError(f"cannot serve {name!r} from {target!r}: no such collection")
    found = route(client, name)
    before = found.target if found is not None else resolve(client, name)
    before_query_tag = found.query_tag if found is not None else ""
    if len(query_tag) > TAG_MAX_LENGTH:
        raise StoreError(f"query model set tag {query_tag!r} is longer than {TAG_MAX_LENGTH} characters")
    _ensure_routes(client, query_tags=bool(query_tag or before_query_tag))
    row = _row(name, target, before or "", query_tag, before_query_tag)
    if not _has_query_tags(client):  # an older routes collection, and no query tag to write: leave it as it is
        row = {k: v for k, v in row.items() if k not in (ROUTE_QUERY_TAG, ROUTE_PREVIOUS_QUERY_TAG)}
    client.upsert(ROUTES, [row])
    logger.info("%s now serves %s%s (before: %s%s)", name, target, f" with queries by {query_tag}" * bool(query_tag),
                before, f" with queries by {before_query_tag}" * bool(before_query_tag))
    return before


def rollback(client, name: str) -> str:
    """Serve what `name` served before the last switch again (its collection and query model set); returns
    that collection."""
    found = route(client, name)
    record = collection_record(client, name)
    if not record.previous or not client.has_collection(record.previous):
        raise StoreError(f"{name} serves {record.collection}, which records no previous collection to go back to")
    switch(client, name, record.previous, found.previous_query_tag if found is not None else "")
    return record.previous
