"""Catalog sync: which products to embed, which rows to rewrite, which to delete.

Every collection row carries two content digests: `embed_digest` over what the model reads (title,
description, the image's bytes) and `row_digest` over everything the row holds. A nightly re-run of
the indexer compares the catalog's digests with the collection's and does only the difference:

    added     in the catalog, not in the collection           -> embed, insert
    changed   model input differs (text or image bytes)       -> embed, upsert
    updated   only other fields differ (price, category...)   -> upsert with the stored vector
    unchanged                                                  -> nothing
    deleted   in the collection, gone from the catalog        -> delete
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from client import store

MISSING_IMAGE = "-"  # the image part of the digest of a product without a usable image


def digest(*parts: str) -> str:
    h = hashlib.blake2b(digest_size=store.DIGEST_LENGTH // 2)
    for part in parts:
        h.update(part.encode("utf-8", errors="surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()


def image_digest(ref, fetch: Callable[[object], bytes]) -> str:
    """The digest of the image bytes the indexer would send (a broken or missing image has its own)."""
    try:
        data = fetch(ref)
    except (OSError, ValueError):
        return MISSING_IMAGE
    return hashlib.blake2b(data, digest_size=store.DIGEST_LENGTH // 2).hexdigest()


def embed_digest(product: Mapping, image: str) -> str:
    """What the product tower reads, exactly as the indexer sends it."""
    return digest(str(product.get("title") or ""), str(product.get("description") or ""), image)


def row_digest(product: Mapping, embed: str, lexical: bool) -> str:
    """Everything the row holds besides its vector: the model input's digest plus the stored fields."""
    fields = store.make_row(product, [], lexical, digests=None)
    fields.pop(store.VECTOR)
    return digest(embed, json.dumps(fields, sort_keys=True, ensure_ascii=False))


@dataclass
class SyncPlan:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def to_embed(self) -> set[str]:
        return set(self.added) | set(self.changed)


def plan(catalog: Mapping[str, tuple[str, str]], collection: Mapping[str, tuple[str, str]]) -> SyncPlan:
    """Compare {product id: (embed digest, row digest)} of the catalog with the collection's."""
    result = SyncPlan()
    for pid, (embed, row) in catalog.items():
        stored = collection.get(pid)
        if stored is None:
            result.added.append(pid)
        elif stored[0] != embed:
            result.changed.append(pid)
        elif stored[1] != row:
            result.updated.append(pid)
        else:
            result.unchanged.append(pid)
    result.deleted = [pid for pid in collection if pid not in catalog]
    return result


def deletion_refused(plan_: SyncPlan, collection_rows: int, max_fraction: float, partial: Iterable[str]) -> str:
    """Why the deletions must not run ("" when they may): a partial catalog or a suspiciously large cut."""
    reasons = [r for r in partial if r]
    if reasons:
        return "; ".join(reasons)
    if collection_rows and len(plan_.deleted) > max_fraction * collection_rows:
        return (f"{len(plan_.deleted)} of {collection_rows} products would go (more than "
                f"{max_fraction:.0%}): pass --max-delete-fraction 1 if the catalog really shrank")
    return ""
