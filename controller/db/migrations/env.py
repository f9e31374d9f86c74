"""Alembic environment: runs on the connection ``controller.db.engine.migrate`` passes in."""

from alembic import context

from controller.db.models import Base

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
