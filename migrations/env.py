"""Alembic environment: the only place tagbus DDL is applied.

The database URL comes from the Alembic config (``sqlalchemy.url``), which ``tagbus
migrate`` fills from its settings; nothing here reads the environment.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from kernel.schema import metadata

config = context.config


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is not set: run migrations through `tagbus migrate`"
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
