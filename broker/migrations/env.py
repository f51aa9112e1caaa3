"""Alembic environment: runs migrations on the URL passed in by ``broker.migrate``."""

from __future__ import annotations

from alembic import context

from broker.db import is_sqlite, make_engine
from broker.tables import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    context.configure(
        url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=is_sqlite(url)
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url, pool_size=1)
    with engine.connect() as connection:
        # SQLite cannot ALTER most things in place; batch mode copies the table.
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=is_sqlite(url)
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
