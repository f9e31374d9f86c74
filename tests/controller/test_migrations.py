"""The Alembic migrations produce exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from controller.db.engine import make_engine, migrate
from controller.db.models import Base


def test_migrations_match_models_and_rerun_is_a_no_op(db_url):
    engine = make_engine(db_url)
    try:
        migrate(engine)
        migrate(engine)  # a restart runs them again
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
