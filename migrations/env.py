"""Alembic environment: run against the connection skillbank hands over (or a URL for alembic's CLI)."""

from alembic import context
from sqlalchemy import create_engine

from skillbank.db.models import Base

config = context.config
target = Base.metadata


def run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        run(conn)
