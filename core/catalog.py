"""Read a product catalog (CSV, JSONL or Parquet) and its images, and report every bad row.

Columns are mapped by name (`ColumnMap`); images may be embedded bytes, a local path (relative to
the catalog file), or an http(s) URL downloaded into a cache and revalidated hourly. Nothing is dropped
silently: a malformed row is listed in the report with its reason, and a product whose image
cannot be read keeps its text (the towers embed it text-only).

Only pandas, numpy and Pillow: the indexing client reads catalogs with this module too.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import http.client
import json
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)

ATTRIBUTES = ("master_category", "sub_category", "article_type", "base_colour", "usage", "gender")
IMAGE_COLUMN_CANDIDATES = ("image", "image_url", "image_path", "img", "imageURL")
# The real catalog this project is developed on, beside the repository (see ../shared/data/README.md).
DEFAULT_CATALOG = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion" / "catalog.parquet")
DEFAULT_CACHE_DIR = Path(os.environ.get("MMSEARCH_CACHE", Path.home() / ".cache" / "mmsearch"))


@dataclass
class ColumnMap:
    """Which catalog column holds what. Empty means absent; image="" means auto-detect."""

    id: str = "product_id"
    title: str = "title"
    description: str = "description"
    image: str = ""
    price: str = "price"
    attributes: tuple[str, ...] = ATTRIBUTES

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add --id-col, --title-col, ... to an argparse parser (shared by training and client)."""
        d = cls()
        group = parser.add_argument_group("catalog columns")
        group.add_argument("--id-col", default=d.id, help="column with the unique product id")
        group.add_argument("--title-col", default=d.title, help="column with the product title")
        group.add_argument("--description-col", default=d.description,
                           help="column with the product description ('' if none)")
        group.add_argument("--image-col", default=d.image,
                           help="column with image bytes, a path relative to the catalog, or an "
                                f"http(s) URL; default: the first of {', '.join(IMAGE_COLUMN_CANDIDATES)}")
        group.add_argument("--price-col", default=d.price, help="column with a numeric price ('' if none)")
        group.add_argument("--attribute-cols", default=",".join(d.attributes),
                           help="comma-separated attribute columns kept as filterable fields; "
                                "missing ones are ignored")

    @classmethod
    def from_args(cls, args) -> ColumnMap:
        attrs = tuple(a.strip() for a in args.attribute_cols.split(",") if a.strip())
        return cls(id=args.id_col, title=args.title_col, description=args.description_col,
                   image=args.image_col, price=args.price_col, attributes=attrs)


@dataclass
class CatalogReport:
    rows: int = 0
    products: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)
    duplicates: list[str] = field(default_factory=list)
    broken_images: list[tuple[str, str]] = field(default_factory=list)  # (product id, reason)
    missing_images: int = 0

    def summary(self) -> str:
        return (f"{self.rows} rows -> {self.products} products; {len(self.malformed)} malformed rows, "
                f"{len(self.duplicates)} duplicate ids, {self.missing_images} without image, "
                f"{len(self.broken_images)} with a broken image (kept, text-only)")

    def log(self, limit: int = 5) -> None:
        logger.info("catalog: %s", self.summary())
        for row, reason in self.malformed[:limit]:
            logger.warning("malformed row %d: %s", row, reason)
        for pid in self.duplicates[:limit]:
            logger.warning("duplicate product id %s: the first row is kept", pid)
        for pid, reason in self.broken_images[:limit]:
            logger.warning("product %s: image unusable (%s)", pid, reason)


class CatalogError(ValueError):
    """The catalog as a whole cannot be read (missing file, unknown format, missing id column)."""


def _read_table(path: Path, report: CatalogReport) -> pd.DataFrame:
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix.startswith(".parquet") or suffix == ".pq":
        return pd.read_parquet(path)
    if suffix.startswith((".jsonl", ".ndjson", ".json")):
        records = []
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict):
                        raise ValueError("not a JSON object")
                    record["_row"] = lineno
                    records.append(record)
                except ValueError as exc:
                    report.malformed.append((lineno, f"invalid JSON ({exc})"))
        return pd.DataFrame.from_records(records)
    if suffix.startswith((".csv", ".tsv")):
        return _read_csv(path, "\t" if suffix.startswith(".tsv") else ",", report)
    raise CatalogError(f"{path}: unknown catalog format {suffix!r} (expected .csv, .tsv, .jsonl, .parquet)")


def _read_csv(path: Path, sep: str, report: CatalogReport) -> pd.DataFrame:
    """Every line of a CSV ends up in a row, in `report.malformed`, or blank: nothing vanishes.

    A stray quote makes a CSV parser swallow the lines after it into one field. Such a record (one
    that spans lines and has the wrong number of fields, or never closes its quote) is reported by
    its first line, and parsing restarts on the line after it. Quoted fields that legitimately span
    lines (a description with line breaks) are kept.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    header: list[str] | None = None
    records: list[list[str]] = []
    start = 0  # index of the first line not yet accounted for
    while start < len(lines):
        reader = csv.reader(lines[start:], delimiter=sep, strict=True)
        first = start  # index of the line the current record begins on
        try:
            for record in reader:
                end = start + reader.line_num  # index after the record's last line
                if not record or record == [""]:
                    first = end
                    continue
                if header is None:
                    header = record
                elif len(record) == len(header):
                    records.append([*record, first + 1])
                elif end - first > 1:  # a quote that swallowed the lines after it
                    raise csv.Error(f"a quoted field runs over {end - first} lines and the record has "
                                    f"{len(record)} of {len(header)} fields")
                else:
                    report.malformed.append((first + 1, f"{len(record)} fields, expected {len(header)}: "
                                                        f"{sep.join(record)[:80]}"))
                first = end
            break
        except csv.Error as exc:
            report.malformed.append((first + 1, f"broken quoting ({exc}): {lines[first].strip()[:80]}"))
            start = first + 1
    if header is None:
        raise CatalogError(f"{path}: empty CSV (no header row)")
    return pd.DataFrame(records, columns=[*header, "_row"], dtype=str).astype({"_row": int})


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _price(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def read_catalog(path: str | os.PathLike, columns: ColumnMap | None = None,
                 limit: int | None = None) -> tuple[pd.DataFrame, CatalogReport]:
    """Read a catalog into a frame with columns product_id, title, description, image, price,
    and the attribute columns that exist (all strings, '' when empty).

    `image` holds what the catalog holds (bytes, a path or URL, or None); resolve it with
    `load_image_bytes`. `attrs.base_dir` is the folder relative image paths start from.
    """
    columns = columns or ColumnMap()
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog not found: {path}")
    report = CatalogReport()
    df = _read_table(path, report)
    if limit is not None:
        df = df.iloc[:limit]
    report.rows = len(df) + len(report.malformed)
    if columns.id not in df.columns:
        raise CatalogError(f"{path}: no id column {columns.id!r}; columns are {list(df.columns)} "
                           "(map yours with --id-col)")
    if columns.title not in df.columns and columns.description not in df.columns:
        raise CatalogError(f"{path}: neither title column {columns.title!r} nor description column "
                           f"{columns.description!r} exists; columns are {list(df.columns)}")
    image_col = columns.image or next((c for c in IMAGE_COLUMN_CANDIDATES if c in df.columns), "")
    if image_col and image_col not in df.columns:
        raise CatalogError(f"{path}: no image column {image_col!r}; columns are {list(df.columns)}")

    rownums = df["_row"].tolist() if "_row" in df.columns else list(range(2, len(df) + 2))
    out = pd.DataFrame({
        "product_id": [_text(v) for v in df[columns.id]],
        "title": [_text(v) for v in df[columns.title]] if columns.title in df.columns else "",
        "description": ([_text(v) for v in df[columns.description]]
                        if columns.description and columns.description in df.columns else ""),
        "image": (df[image_col].where(df[image_col].notna(), None).tolist() if image_col else None),
        "price": ([_price(v) for v in df[columns.price]]
                  if columns.price and columns.price in df.columns else float("nan")),
    })
    for attr in columns.attributes:
        if attr in df.columns:
            out[attr] = [_text(v) for v in df[attr]]
    out["_row"] = rownums

    keep = []
    seen = set()
    for i, (pid, title, desc) in enumerate(zip(out["product_id"], out["title"], out["description"])):
        if not pid:
            report.malformed.append((rownums[i], "empty product id"))
        elif not title and not desc:
            report.malformed.append((rownums[i], f"product {pid}: no title and no description"))
        elif pid in seen:
            report.duplicates.append(pid)
        else:
            seen.add(pid)
            keep.append(i)
            continue
    out = out.iloc[keep].reset_index(drop=True)
    out["image"] = [v if v not in ("", b"") else None for v in out["image"]]
    report.missing_images = int(out["image"].isna().sum())
    report.products = len(out)
    out.attrs["base_dir"] = str(path.parent.resolve())
    out.attrs["path"] = str(path.resolve())
    return out, report


def has_image_ref(ref) -> bool:
    """Whether a catalog image cell holds something to fetch (not None, NaN or empty)."""
    return isinstance(ref, (bytes, str)) and bool(ref)


@dataclass
class ImageFetcher:
    """Resolves a catalog image reference to encoded bytes: bytes as they are, a path (relative to
    `base_dir`), or an http(s) URL, downloaded with size and time limits into `cache_dir`.

    How often a URL is asked again: its copy is served from the cache, with no request, for `max_age_s`
    (default one hour) after it was downloaded or last confirmed. The first fetch after that revalidates:
    a conditional GET with the server's ETag (If-None-Match) and Last-Modified (If-Modified-Since) costs
    a 304 and no body when the photo is unchanged (and restarts the hour), and downloads the new bytes
    when it changed; a server that sends neither validator is downloaded in full again. So a catalog
    sync run an hour or more after the previous one digests every replaced photo, while one run's digest
    and embed passes (and the app's repeated views) share one download. A run sooner than that can miss
    a photo replaced in between: `max_age_s=0` revalidates on every fetch, `math.inf` never does.
    When the server cannot be asked (offline, a timeout, a 5xx) the stale copy is served, with one
    warning per fetcher; a 404 or 410 is an error, as is any failure with no copy to serve.

    A copy is `<sha1(url)>` beside a JSON sidecar `<sha1(url)>.json` (when it was confirmed, its
    validators, its own digest: a sidecar is trusted only for the bytes it describes). Every write goes
    through a temporary file of its writer's own, renamed into place, so threads or processes fetching
    one URL at once all succeed. `clock` (wall seconds: the cache outlives the process) is injectable.
    """

    base_dir: str = "."
    cache_dir: Path = DEFAULT_CACHE_DIR / "images"
    timeout_s: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_age_s: float = 3600.0  # seconds a downloaded or revalidated copy is served without asking the server
    clock: Callable[[], float] = time.time
    _warned_stale: bool = field(default=False, init=False, repr=False, compare=False)

    def __call__(self, ref) -> bytes:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            return bytes(ref)
        if not isinstance(ref, str) or not ref:
            raise FileNotFoundError("no image")
        if ref.startswith(("http://", "https://")):
            return self._download(ref)
        path = Path(ref) if os.path.isabs(ref) else Path(self.base_dir) / ref
        if path.stat().st_size > self.max_bytes:
            raise ValueError(f"{path}: larger than {self.max_bytes:,} bytes")
        return path.read_bytes()

    def _download(self, url: str) -> bytes:
        key = hashlib.sha1(url.encode()).hexdigest()
        cached = Path(self.cache_dir) / key
        sidecar = cached.with_name(key + ".json")
        data, meta = self._read_cache(cached, sidecar)
        now = self.clock()
        if meta is not None and 0 <= now - meta["fetched_at"] < self.max_age_s:  # a clock set back: ask
            return data
        headers = {"User-Agent": "mmsearch/0.1"}
        if meta is not None:
            for name, header in (("etag", "If-None-Match"), ("last_modified", "If-Modified-Since")):
                if meta.get(name):
                    headers[header] = meta[name]
        try:
            status, body, response_headers = self._get(url, headers)
        except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
            gone = isinstance(exc, urllib.error.HTTPError) and exc.code in (404, 410)
            if data is None or gone:
                raise ConnectionError(f"cannot download {url}: {exc} (offline? downloaded images are cached "
                                      f"in {self.cache_dir})") from None
            # Serve the stale copy rather than raise: it is what the collection already holds, so a sync
            # during an outage sees the same digest and leaves the product alone, where an error would
            # make every URL product "changed" and re-embed the catalog text-only. Only a server saying
            # the photo is gone (404/410) drops it. The copy's time is not refreshed: the next fetch asks.
            self._warn_stale(url, exc, cached)
            return data
        if status == 304 and data is not None:
            fresh = {k: response_headers.get(h) for k, h in (("etag", "ETag"), ("last_modified", "Last-Modified"))}
            self._write(sidecar, json.dumps({**(meta or {}), **{k: v for k, v in fresh.items() if v},
                                             "fetched_at": now, "sha256": hashlib.sha256(data).hexdigest()}))
            return data
        if status == 304:
            raise ConnectionError(f"cannot download {url}: 304 Not Modified to an unconditional request")
        if len(body) > self.max_bytes:
            raise ValueError(f"{url}: larger than {self.max_bytes:,} bytes")
        self._write(cached, body)  # the bytes first: a sidecar never describes bytes not yet in place
        self._write(sidecar, json.dumps({"url": url, "fetched_at": now, "etag": response_headers.get("ETag"),
                                         "last_modified": response_headers.get("Last-Modified"),
                                         "sha256": hashlib.sha256(body).hexdigest()}))
        return body

    def _get(self, url: str, headers: dict[str, str]):
        """(status, body, headers) of a GET; a 304 is an answer, not an error. Raises on a truncated body."""
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                body = response.read(self.max_bytes + 1)
                size = response.headers.get("Content-Length", "")
                if len(body) <= self.max_bytes and size.isdigit() and len(body) < int(size):
                    raise ConnectionError(f"truncated: {len(body):,} of {int(size):,} bytes")
                return response.status, body, response.headers
        except urllib.error.HTTPError as exc:
            if exc.code != 304:
                raise
            exc.close()
            return 304, b"", exc.headers

    @staticmethod
    def _read_cache(cached: Path, sidecar: Path) -> tuple[bytes | None, dict | None]:
        """The cached bytes (None if absent) and their sidecar (None if absent, unreadable or not theirs)."""
        try:
            data = cached.read_bytes()
        except FileNotFoundError:
            return None, None
        try:
            meta = json.loads(sidecar.read_text())
            if (isinstance(meta, dict) and isinstance(meta.get("fetched_at"), (int, float))
                    and meta.get("sha256") == hashlib.sha256(data).hexdigest()):
                return data, meta
        except (OSError, ValueError):
            pass
        return data, None  # an older cache, or another writer's sidecar: revalidate without validators

    @staticmethod
    def _write(path: Path, data: bytes | str) -> None:
        """Write through a temporary file of this writer's own, renamed into place (atomic, never shared)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _warn_stale(self, url: str, exc: Exception, cached: Path) -> None:
        if self._warned_stale:  # one warning per fetcher: an outage would otherwise log once per product
            logger.debug("cannot revalidate %s (%s): serving the cached copy", url, exc)
            return
        self._warned_stale = True
        logger.warning("cannot revalidate %s (%s): serving the cached copy %s; further stale copies are "
                       "logged at debug level", url, exc, cached)
