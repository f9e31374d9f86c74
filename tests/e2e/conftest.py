"""End-to-end plumbing: a fresh PostgreSQL schema per test, scenario files written on the fly."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    schema = "e2e_" + uuid.uuid4().hex[:12]
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    eng.dispose()
    yield f"{pg_url}?options=-csearch_path%3D{schema}"
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    eng.dispose()
