"""Shared fixtures: real catalog rows from ../shared/data/fashion, tiny models, temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub in tests

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "fashion"
CATALOG = DATA / "catalog.parquet"
SAMPLE_CSV = DATA / "sample" / "products.csv"


@pytest.fixture(scope="session")
def catalog_path() -> Path:
    if not CATALOG.is_file():
        pytest.fail(f"the fashion catalog is missing at {CATALOG}: tests read real data from ../shared")
    return CATALOG


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    return SAMPLE_CSV
