"""Alembic environment for iommupt-store.

``config.attributes["connection"]`` may hold an Engine or a Connection (the
store passes a Connection, pytest-alembic an Engine); otherwise the URL in
``sqlalchemy.url`` is used. SQLite runs in batch mode so that constraint and
column changes work through "move and copy".
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine

from iommupt_store.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=bool(url and url.startswith("sqlite")),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        _run(given)
        return
    engine = (
        given if isinstance(given, Engine) else create_engine(str(config.get_main_option("sqlalchemy.url")))
    )
    with engine.connect() as connection:
        _run(connection)
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
