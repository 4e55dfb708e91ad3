"""Index a catalog: product embeddings from Triton's product_encoder, upserted into Milvus.

    python client/index.py --catalog ../shared/data/fashion/catalog.parquet
    python client/index.py --catalog products.csv --milvus-uri http://milvus:19530 --image-col image_url

Re-running syncs: each row carries content digests (client/sync.py), so a re-run embeds only the
products that are new or whose text or image bytes changed, rewrites rows whose other fields
changed with their stored vector, deletes products gone from the catalog, and reports each count.
An interrupted run resumes where it stopped; writes are upserts by product id. A product whose
image is missing or broken is indexed from its text, and counted.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python client/index.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from client import serving, store, sync
from client.connection import add_connection_args, connect
from client.deadlines import BATCH_TIMEOUT_S
from client.encoder import EncoderUnavailable, EncodingError, TritonEncoder
from core.catalog import DEFAULT_CATALOG, CatalogError, ColumnMap, ImageFetcher, has_image_ref, read_catalog
from core.specs import PRODUCT_ENCODER

DEFAULT_MAX_DELETE_FRACTION = 0.2  # a bigger cut is more likely a truncated catalog file than a real one
PROGRESS_EVERY = 5000  # products between progress lines when stderr is not a terminal
logger = logging.getLogger("client.index")


@dataclass
class IndexReport:
    catalog_rows: int = 0
    indexed: int = 0  # rows written with a fresh embedding (added + changed)
    added: int = 0
    changed: int = 0  # model input changed (text or image bytes): re-embedded
    updated: int = 0  # only stored fields changed: rewritten with the stored vector
    unchanged: int = 0  # nothing to do (or, in a collection without digests, already there)
    deleted: int = 0
    deletion_refused: str = ""  # why products gone from the catalog were kept
    text_only: list[tuple[str, str]] = field(default_factory=list)  # (id, why the image was not used)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, error)
    malformed_rows: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return self.unchanged

    def summary(self) -> str:
        rate = self.indexed / self.seconds if self.seconds else 0.0
        kept = f" (kept {self.deletion_refused})" if self.deletion_refused else ""
        return (f"added {self.added}, changed {self.changed}, updated {self.updated} (fields only), "
                f"deleted {self.deleted}{kept}, unchanged {self.unchanged}, failed {len(self.failed)}; "
                f"{len(self.text_only)} indexed text-only (image missing or broken); "
                f"{self.malformed_rows} malformed catalog rows; {self.seconds:.1f}s "
                f"({rate:.1f} products embedded/s)")


def text_length(title: object, description: object) -> int:
    """Sort key for indexing order: requests of similar text lengths, because the CPU flavour pads each batch
    only to its longest text."""
    return len(str(title or "")) + len(str(description or ""))


WRITE_EVERY = 512  # embedded rows buffered per Milvus upsert (--write-every)


class Indexer:
    def __init__(self, triton_url: str, protocol: str, client, collection: str, batch_size: int = 16,
                 concurrency: int = 4, retries: int = 3, backoff_s: float = 1.0,
                 timeout_s: float = BATCH_TIMEOUT_S, write_every: int = WRITE_EVERY, tag: str = ""):
        # `client`'s own deadlines bound every Milvus call (client/deadlines.py); `timeout_s` bounds a Triton batch.
        self.triton_url, self.protocol, self.timeout_s = triton_url, protocol, timeout_s
        self.tag = tag  # the Triton model set that embeds (an upgrade indexes with the new one)
        self.write_every = write_every  # embedded rows buffered per Milvus upsert: what a crash can cost
        self.client, self.collection = client, collection
        self.batch_size, self.concurrency = batch_size, concurrency
        self.retries, self.backoff_s = retries, backoff_s
        self._local = threading.local()

    def encoder(self) -> TritonEncoder:
        if not hasattr(self._local, "encoder"):  # one connection per worker thread
            self._local.encoder = TritonEncoder(self.triton_url, self.protocol, self.timeout_s, self.tag)
        return self._local.encoder

    def _with_retries(self, fn, *args):
        for attempt in range(self.retries + 1):
            try:
                return fn(*args)
            except EncoderUnavailable:
                if attempt == self.retries:
                    raise
                delay = self.backoff_s * 2 ** attempt
                logger.warning("Triton unavailable, retrying in %.1fs (%d/%d)", delay, attempt + 1, self.retries)
                time.sleep(delay)

    def embed_batch(self, rows: list[dict], images: list[bytes | None]):
        """(rows, vectors, text_only, failed) for one batch; bad images are retried text-only."""
        enc = self.encoder()
        titles = [r["title"] for r in rows]
        descriptions = [r["description"] for r in rows]
        try:
            vectors = self._with_retries(enc.embed_products, titles, descriptions, images)
            return rows, list(vectors), [], []
        except EncodingError:
            pass  # someone in the batch is bad: find out who, one by one
        kept, vectors, text_only, failed = [], [], [], []
        for row, title, desc, image in zip(rows, titles, descriptions, images):
            try:
                vectors.append(self._with_retries(enc.embed_products, [title], [desc], [image])[0])
                kept.append(row)
            except EncodingError as exc:
                try:
                    vectors.append(self._with_retries(enc.embed_products, [title], [desc], [None])[0])
                    kept.append(row)
                    text_only.append((row[store.ID], str(exc)))
                except EncodingError as exc2:
                    failed.append((row[store.ID], str(exc2)))
        return kept, vectors, text_only, failed

    def run(self, catalog: str, columns: ColumnMap | None = None, limit: int | None = None,
            reindex: bool = False, index_type: str | None = None, metric: str = store.METRIC,
            max_delete_fraction: float = DEFAULT_MAX_DELETE_FRACTION) -> IndexReport:
        """Sync the collection with the catalog: embed what is new or changed, rewrite rows whose other
        fields changed, delete what left the catalog (not with `limit` or malformed rows: the catalog
        read is partial then). `reindex` embeds every product again."""
        started = time.monotonic()
        report = IndexReport()
        df, catalog_report = read_catalog(catalog, columns, limit=limit)
        catalog_report.log()
        report.catalog_rows, report.malformed_rows = catalog_report.rows, len(catalog_report.malformed)
        encoder = self.encoder()
        encoder.check_ready([PRODUCT_ENCODER])
        store.ensure_collection(self.client, encoder.embed_dim, self.collection, index_type, metric,
                                encoder.fingerprint, self.tag)
        lexical = store.has_lexical(self.client, self.collection)
        if not lexical:
            logger.warning("collection %s has no BM25 field (made before it, or by a Milvus without it): "
                           "indexing vectors only; `--recreate` rebuilds it with lexical search", self.collection)
        rows = df.to_dict("records")
        fetch = ImageFetcher(base_dir=df.attrs["base_dir"])
        if store.has_digests(self.client, self.collection):
            digests = self._digests(rows, fetch, lexical)
            stored = store.read_digests(self.client, self.collection)
            plan = sync.plan(digests, stored)
            report.added, report.changed = len(plan.added), len(plan.changed)
            report.unchanged = len(plan.unchanged) if not reindex else 0
            to_embed = plan.to_embed if not reindex else set(digests)
            partial = (f"the catalog was read with --limit {limit}" if limit else "",
                       f"{report.malformed_rows} catalog rows are malformed" if report.malformed_rows else "")
            report.deletion_refused = sync.deletion_refused(plan, len(stored), max_delete_fraction, partial)
        else:  # a collection made before sync: resume by id, as before
            logger.warning("collection %s has no content digests (made before catalog sync): products it holds "
                           "are kept as they are; index into a new --collection (or --recreate) to sync",
                           self.collection)
            digests, plan = {}, None
            done = set() if reindex else store.existing_ids(self.client, [r[store.ID] for r in rows], self.collection)
            report.unchanged = len(done)
            to_embed = {r[store.ID] for r in rows} - done
            report.added = len(to_embed)
        self._embed(sorted((r for r in rows if r[store.ID] in to_embed),
                           key=lambda r: text_length(r["title"], r["description"])),
                    digests, lexical, fetch, report, started)
        if plan is not None and not reindex:
            updated = set(plan.updated)
            report.updated = self._rewrite_fields([r for r in rows if r[store.ID] in updated], digests, lexical)
            if plan.deleted and report.deletion_refused:
                logger.warning("not deleting %d products gone from the catalog: %s", len(plan.deleted),
                               report.deletion_refused)
            elif plan.deleted:
                report.deleted = store.delete(self.client, plan.deleted, self.collection)
        report.seconds = time.monotonic() - started
        return report

    def _digests(self, rows: list[dict], fetch: ImageFetcher, lexical: bool) -> dict[str, tuple[str, str]]:
        """(embed, row) digests of every catalog row; reads every image (threads: files or the URL cache)."""
        refs = [r.get("image") if has_image_ref(r.get("image")) else None for r in rows]
        with ThreadPoolExecutor(self.concurrency) as pool:
            images = list(pool.map(lambda ref: sync.image_digest(ref, fetch) if ref is not None
                                   else sync.MISSING_IMAGE, refs, chunksize=256))
        digests = {}
        for r, image in zip(rows, images):
            embed = sync.embed_digest(r, image)
            digests[r[store.ID]] = (embed, sync.row_digest(r, embed, lexical))
        return digests

    def _rewrite_fields(self, rows: list[dict], digests: dict, lexical: bool) -> int:
        """Rows whose stored fields changed but whose model input did not: the stored vector, new fields."""
        written = 0
        for start in range(0, len(rows), 1000):
            part = rows[start:start + 1000]
            vectors = store.read_vectors(self.client, [r[store.ID] for r in part], self.collection)
            written += store.upsert(self.client, [store.make_row(r, vectors[r[store.ID]], lexical, digests[r[store.ID]])
                                                  for r in part if r[store.ID] in vectors], self.collection)
        return written

    def _embed(self, rows: list[dict], digests: dict, lexical: bool, fetch: ImageFetcher, report: IndexReport,
               started: float) -> None:
        """Embed `rows` through Triton and upsert them, in bounded concurrent batches."""
        def load_images(batch: list[dict]) -> tuple[list[bytes | None], list[tuple[str, str]]]:
            images, missing = [], []
            for r in batch:
                ref = r.get("image")
                if not has_image_ref(ref):
                    images.append(None)
                    missing.append((r[store.ID], "no image"))
                    continue
                try:
                    images.append(fetch(ref))
                except (OSError, ValueError) as exc:
                    images.append(None)
                    missing.append((r[store.ID], f"{type(exc).__name__}: {exc}"))
            return images, missing

        def job(batch: list[dict]):
            images, missing = load_images(batch)
            kept, vectors, text_only, failed = self.embed_batch(batch, images)
            return kept, vectors, missing + text_only, failed

        batches = [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        bar = tqdm(total=len(rows), desc="index", unit="product", mininterval=1, disable=None)  # a bar on a TTY only
        pending: set[Future] = set()
        buffer: list[dict] = []
        processed = 0
        with ThreadPoolExecutor(self.concurrency) as pool:
            try:
                queue = iter(batches)
                while True:
                    while len(pending) < 2 * self.concurrency:  # bounded: memory stays flat
                        batch = next(queue, None)
                        if batch is None:
                            break
                        pending.add(pool.submit(job, batch))
                    if not pending:
                        break
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        kept, vectors, text_only, failed = future.result()
                        buffer += [store.make_row(r, v, lexical, digests.get(r[store.ID]))
                                   for r, v in zip(kept, vectors)]
                        report.text_only += text_only
                        report.failed += failed
                        bar.update(len(kept) + len(failed))
                        before, processed = processed, processed + len(kept) + len(failed)
                        if bar.disable and processed // PROGRESS_EVERY > before // PROGRESS_EVERY:
                            logger.info("embedded %d of %d products (%.0f/s)", processed, len(rows),
                                        processed / max(1e-9, time.monotonic() - started))
                    if len(buffer) >= self.write_every:
                        report.indexed += store.upsert(self.client, buffer, self.collection)
                        buffer = []
            finally:
                for future in pending:
                    future.cancel()
                # What was embedded is kept: a re-run resumes after it.
                report.indexed += store.upsert(self.client, buffer, self.collection)
                bar.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python client/index.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=DEFAULT_CATALOG, help="catalog file: .parquet, .csv or .jsonl")
    p.add_argument("--limit", type=int, default=None, help="index only the first N catalog rows")
    add_connection_args(p, batch=True)
    p.add_argument("--index-type", choices=list(store.INDEX_PARAMS), default=None,
                   help="vector index of a new collection (default: HNSW on a Milvus server, AUTOINDEX on Lite, "
                        "which has only AUTOINDEX, FLAT and IVF_FLAT)")
    p.add_argument("--metric", choices=store.METRICS, default=store.METRIC,
                   help="similarity of the vector index (embeddings are unit vectors: all three rank alike); "
                        "search reads it from the collection")
    p.add_argument("--batch-size", type=int, default=16, help="products per Triton request")
    p.add_argument("--concurrency", type=int, default=4, help="Triton requests in flight")
    p.add_argument("--retries", type=int, default=3, help="retries (with exponential backoff) when Triton is down")
    p.add_argument("--write-every", type=int, default=WRITE_EVERY,
                   help="embedded products buffered per Milvus write: what a crash can cost to re-embed")
    p.add_argument("--reindex", action="store_true",
                   help="embed every product again, changed or not (upsert replaces them; nothing is deleted)")
    p.add_argument("--max-delete-fraction", type=float, default=DEFAULT_MAX_DELETE_FRACTION,
                   help="refuse to delete more than this fraction of the collection in one sync (a truncated "
                        "catalog file looks like a mass deletion); 1 allows any")
    p.add_argument("--recreate", action="store_true", help="drop the collection first")
    ColumnMap.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        client = connect(args)
        routed = serving.route(client, args.collection)
        if args.recreate and routed is not None:
            print(f"error: {args.collection} is a serving name routed to {routed.target}: --recreate would take "
                  f"search away from every client. Rebuild it with client/upgrade.py (indexes beside it, switches "
                  f"when it is ready), or drop {routed.target} by its own name (--collection {routed.target} "
                  f"--recreate) once nothing serves it", file=sys.stderr)
            return 2
        if args.recreate and client.has_collection(args.collection):
            client.drop_collection(args.collection)
        collection, tag = args.collection, ""
        if serving.resolve(client, collection):  # a routed name (after an upgrade): sync what it serves
            record = serving.collection_record(client, collection)
            collection, tag = record.collection, record.tag
        indexer = Indexer(args.triton_url, args.protocol, client, collection, args.batch_size,
                          args.concurrency, args.retries, timeout_s=args.batch_timeout,
                          write_every=args.write_every, tag=tag)
        report = indexer.run(args.catalog, ColumnMap.from_args(args), args.limit, args.reindex, args.index_type,
                             args.metric, args.max_delete_fraction)
        held = store.count(client, collection)
    except store.errors() as exc:
        print(f"error: {store.failure(exc, args.milvus_uri)}", file=sys.stderr)
        print("nothing indexed so far is lost: run the same command again to resume", file=sys.stderr)
        return 2
    except (EncoderUnavailable, store.StoreError, CatalogError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("nothing indexed so far is lost: run the same command again to resume", file=sys.stderr)
        return 2
    logger.info("%s", report.summary())
    for pid, why in report.text_only[:5]:
        logger.info("text-only: product %s (%s)", pid, why)
    for pid, why in report.failed[:5]:
        logger.warning("failed: product %s (%s)", pid, why)
    logger.info("collection %s now holds %d products", collection, held)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
